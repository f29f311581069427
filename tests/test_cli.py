"""The `rsclip` command line as a user runs it: embed, classify, init, convert, models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from rsclip_jax.checkpoint import load_checkpoint
from rsclip_jax.cli import main
from rsclip_jax.preprocess import load_and_preprocess, normalize_images
from rsclip_jax.tokenizer import tokenize

CAPTIONS = ["Many trees in the middle of the picture .", "Café &amp; harbour", "There are 61 trees in the picture ."]


@pytest.fixture
def captions_file(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n\n", encoding="utf-8")  # a trailing blank line is ignored
    return path


def _reference(checkpoint, paths, texts):
    """Embeddings straight from the model, bypassing the CLI's batching and padding."""
    model = load_checkpoint(checkpoint)
    images = np.stack([load_and_preprocess(p, model.config.vision.image_size) for p in paths])
    img = model.encode_image(normalize_images(images), normalize=True)
    txt = model.encode_text(tokenize(texts), normalize=True)
    return np.asarray(img), np.asarray(txt)


def test_embed_images_and_texts(tiny_checkpoint, tiles, captions_file, tmp_path):
    out = tmp_path / "out.npz"
    # The directory expands to its tiles sorted by name; two more files make a second batch.
    # --batch-size 3 rounds up to one example per device (8 simulated devices): 8 + 1 padded.
    expected = [str(p) for p in tiles] + [str(tiles[1]), str(tiles[0])]
    rc = main(["embed", "--checkpoint", str(tiny_checkpoint), "--images", str(tiles[0].parent), str(tiles[1]),
               str(tiles[0]), "--texts", str(captions_file), "--out", str(out), "--batch-size", "3"])
    assert rc == 0
    z = np.load(out)
    assert list(z["image_paths"]) == expected
    assert list(z["texts"]) == CAPTIONS
    assert z["image_embeddings"].shape == (len(expected), 64) and z["image_embeddings"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z["image_embeddings"], axis=1), 1.0, atol=1e-5)
    img, txt = _reference(tiny_checkpoint, expected, CAPTIONS)
    np.testing.assert_allclose(z["image_embeddings"], img, atol=1e-5)
    np.testing.assert_allclose(z["text_embeddings"], txt, atol=1e-5)


def test_embed_either_alone_and_explicit_order(tiny_checkpoint, tiles, captions_file, tmp_path):
    out = tmp_path / "texts.npz"
    assert main(["embed", "--checkpoint", str(tiny_checkpoint), "--texts", str(captions_file), "--out", str(out)]) == 0
    assert set(np.load(out).files) == {"text_embeddings", "texts"}
    out = tmp_path / "images.npz"
    order = [str(tiles[2]), str(tiles[0])]
    assert main(["embed", "--checkpoint", str(tiny_checkpoint), "--images", *order, "--out", str(out)]) == 0
    z = np.load(out)
    assert list(z["image_paths"]) == order and "text_embeddings" not in z.files


def test_bad_image_fails_or_is_skipped(tiny_checkpoint, tiles, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(tiles[0], folder / "a_good.png")
    (folder / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    args = ["embed", "--checkpoint", str(tiny_checkpoint), "--images", str(folder), "--out", str(tmp_path / "o.npz")]
    assert main(args) == 1
    assert "b_corrupt.jpg" in capsys.readouterr().err
    assert main(args + ["--skip-bad"]) == 0
    assert "warning: skipping unreadable image" in capsys.readouterr().err
    z = np.load(tmp_path / "o.npz")
    assert [p.split("/")[-1] for p in z["image_paths"]] == ["a_good.png"]
    assert [p.split("/")[-1] for p in z["skipped_images"]] == ["b_corrupt.jpg"]


def test_non_utf8_text_file_names_the_line(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nsecond\ncaf\xe9 in latin-1\n".encode("utf-8").replace(b"\xc3\xa9", b"\xe9"))
    rc = main(["embed", "--checkpoint", str(tiny_checkpoint), "--texts", str(path), "--out", str(tmp_path / "o.npz")])
    assert rc == 1
    assert f"{path}:3: not valid UTF-8 (byte 0xe9 at column 4)" in capsys.readouterr().err


def test_unknown_model_and_mismatched_checkpoint(tiny_checkpoint, tmp_path, capsys):
    args = ["embed", "--checkpoint", str(tiny_checkpoint), "--texts", __file__, "--out", str(tmp_path / "o.npz")]
    assert main(args + ["--model", "ViT-Z-99"]) == 1
    assert "unknown model name 'ViT-Z-99'; known models:" in capsys.readouterr().err
    assert main(args + ["--model", "tiny-RN"]) == 1
    err = capsys.readouterr().err
    assert str(tiny_checkpoint) in err and "missing keys" in err and "unexpected keys" in err


def test_classify_prints_top_k_and_writes_json(tiny_checkpoint, tiles, tmp_path, capsys):
    out = tmp_path / "cls.json"
    rc = main(["classify", "--checkpoint", str(tiny_checkpoint), "--labels", "forest, water,buildings",
               "--top-k", "2", "--json", str(out), str(tiles[0]), str(tiles[1])])
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(tiles[0]) and len(printed) == 2 * 3
    result = json.loads(out.read_text())
    assert result["labels"] == ["forest", "water", "buildings"]
    top = result["results"][0]["top"]
    assert len(top) == 2 and top[0]["prob"] >= top[1]["prob"] and 0 < top[0]["prob"] + top[1]["prob"] <= 1


def test_classify_probabilities_match_model(tiny_checkpoint, tiles, tmp_path):
    out = tmp_path / "cls.json"
    templates = tmp_path / "t.txt"
    templates.write_text("# comment\na satellite photo of {}.\n")
    labels = ["forest", "water"]
    main(["classify", "--checkpoint", str(tiny_checkpoint), "--labels", ",".join(labels), "--templates",
          str(templates), "--json", str(out), str(tiles[0])])
    img, txt = _reference(tiny_checkpoint, [tiles[0]], [f"a satellite photo of {c}." for c in labels])
    scale = float(np.exp(nnx.state(load_checkpoint(tiny_checkpoint))["logit_scale"][...]))
    want = np.asarray(jax.nn.softmax(scale * img @ txt.T))[0]
    got = {t["label"]: t["prob"] for t in json.loads(out.read_text())["results"][0]["top"]}
    np.testing.assert_allclose([got[c] for c in labels], want, atol=1e-5)


def test_templates_need_placeholder(tiny_checkpoint, tiles, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("a satellite photo\n")
    rc = main(["classify", "--checkpoint", str(tiny_checkpoint), "--labels", "a,b", "--templates", str(bad), str(tiles[0])])
    assert rc == 1 and "placeholder" in capsys.readouterr().err


def test_init_convert_and_models_entry_point(tmp_path):
    assert main(["init", "--model", "tiny-RN", "--out", str(tmp_path / "rn.pt")]) == 0
    assert main(["convert", str(tmp_path / "rn.pt"), str(tmp_path / "rn.safetensors"), "--model", "tiny-RN"]) == 0
    a = nnx.state(load_checkpoint(tmp_path / "rn.pt", model="tiny-RN"))
    b = nnx.state(load_checkpoint(tmp_path / "rn.safetensors", model="tiny-RN"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    listed = subprocess.run([sys.executable, "-m", "rsclip_jax", "models"], capture_output=True, text=True, check=True)
    assert "RemoteCLIP-ViT-L-14" in listed.stdout.split() and "ViT-B-32-quickgelu" in listed.stdout.split()


def test_help_lists_every_command_without_importing_any():
    """`rsclip --help` and a mistyped command answer at once: no command module (nor JAX) is imported."""
    code = ("import sys\nfrom rsclip_jax.cli import main\n"
            "for argv in (['--help'], ['trian']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        print('exit', e.code)\n"
            "print(sorted(m for m in sys.modules if m.startswith('rsclip_jax.cli.') or m == 'jax'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "['rsclip_jax.cli.commands']", out.stdout
    assert "exit 0" in out.stdout and "exit 2" in out.stdout
    from rsclip_jax.cli.commands import COMMAND_HELP

    for name, help_text in COMMAND_HELP.items():
        assert name in out.stdout and help_text.split()[0] in out.stdout
    assert "invalid choice: 'trian'" in out.stderr


def test_each_command_module_registers_exactly_its_commands_with_their_help():
    """The table `rsclip --help` reads matches what each module registers (one place for each help)."""
    import argparse

    from rsclip_jax.cli import build_parser
    from rsclip_jax.cli.commands import COMMAND_HELP, COMMAND_MODULES

    assert set(COMMAND_HELP) == set(COMMAND_MODULES)
    for name, module in COMMAND_MODULES.items():
        sub = next(a for a in build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
        assert name in sub.choices
        registered = {a.dest: a.help for a in sub._choices_actions}
        assert {c for c, m in COMMAND_MODULES.items() if m == module} == set(registered), module
        assert registered[name] == COMMAND_HELP[name]
