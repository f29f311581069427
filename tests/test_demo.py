"""The README's main job, shortened: build -> train -> export -> report, and the export loads in open_clip."""

from __future__ import annotations

import numpy as np
import torch

from conftest import REPO, SAMPLES


def test_demo_end_to_end_and_open_clip_interop(tmp_path, capsys, monkeypatch):
    import open_clip

    from rsclip_jax.checkpoint import load_checkpoint
    from rsclip_jax.cli import main
    from rsclip_jax.models import get_model_config
    from rsclip_jax.tokenizer import tokenize

    monkeypatch.chdir(REPO)
    demo = ["demo", "--workdir", str(tmp_path), "--samples", str(SAMPLES), "--config.total_steps=40",
            "--config.eval_every_steps=20", "--config.checkpoint_every_steps=20"]
    assert main(demo) == 0
    out = capsys.readouterr().out
    # A second run reuses the trained model: no new steps, the same held-out retrieval row.
    train_log = (tmp_path / "train" / "metrics.jsonl").read_text()
    assert main(demo) == 0
    again = capsys.readouterr().out
    assert (tmp_path / "train" / "metrics.jsonl").read_text() == train_log

    def retrieval_row(text):
        return [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()][0]

    assert retrieval_row(again) == retrieval_row(out)
    assert "n/a" not in retrieval_row(out)
    assert "[demo] data: 195 of 195 images" in out and "held-out retrieval on 36 images" in out
    assert "| mean recall | random ranking |" in out
    import json

    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    for task in ("retrieval", "zeroshot", "linear_probe", "knn", "fewshot", "counting"):
        assert task in report, task
    assert (tmp_path / "eval" / "report_plots" / "fewshot.png").stat().st_size > 0
    chance = 100.0 / len(report["knn"]["classes"])  # 4 land-use classes
    assert report["knn"]["top1"] > chance and report["linear_probe"]["top1"] > chance
    assert "## Image–text retrieval (%)" in out

    # The exported model is an OpenCLIP state_dict: open_clip loads it strictly and agrees with JAX.
    ours = load_checkpoint(tmp_path / "model.safetensors")  # the file records its architecture (GELU)
    assert ours.config == get_model_config("tiny-ViT")
    from safetensors.torch import load_file

    cfg = ours.config
    torch_model = open_clip.model.CLIP(
        cfg.embed_dim,
        dict(image_size=cfg.vision.image_size, layers=cfg.vision.layers, width=cfg.vision.width,
             patch_size=cfg.vision.patch_size, head_width=cfg.vision.head_width),
        dict(context_length=77, vocab_size=49408, width=cfg.text.width, heads=cfg.text.heads, layers=cfg.text.layers),
    ).eval()
    torch_model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    tokens = tokenize(["Many trees in the middle of the picture ."])
    with torch.no_grad():
        want = torch_model.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True).numpy()
    np.testing.assert_allclose(np.asarray(ours.encode_text(tokens, normalize=True)), want, atol=1e-5)
