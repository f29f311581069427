"""`rsclip demo`: the README's main job on the bundled sample corpus.

1. `rsclip data build` on `data/samples/train/captions.csv` (real tiles, B2C/M2B captions);
2. `rsclip train --config configs/demo.py`: a tiny CLIP from scratch, with retrieval evals;
3. export the trained model as an OpenCLIP state_dict (`model.safetensors`);
4. print a short report: the loss curve and held-out retrieval against random ranking;
5. `rsclip eval --suite remoteclip` on the corpus: retrieval, zero-shot, k-NN, linear probe,
   few-shot and counting, with the report tables printed and plots written to `eval/`.

Everything goes under `--workdir`; rerunning resumes or reuses what is already there.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from rsclip_jax.data.build import BuildConfig, build

DEMO_CONFIG = os.path.join("configs", "demo.py")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build data, train and evaluate on the bundled samples (README quick start)")
    p.add_argument("--workdir", default="runs/demo", help="where shards, checkpoints, metrics and the model go")
    p.add_argument("--samples", default="data/samples", help="the bundled sample corpus (run from the repo root)")
    p.add_argument("--config", default=DEMO_CONFIG, help="training config (default: configs/demo.py)")
    p.set_defaults(func=run_demo, accepts_overrides=True)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def run_demo(args: argparse.Namespace) -> int:
    from rsclip_jax.checkpoint import save_checkpoint
    from rsclip_jax.train.config import load_config
    from rsclip_jax.train.evals import eval_hooks, random_ranking_mean_recall
    from rsclip_jax.train.export import model_from_workdir
    from rsclip_jax.train.loop import read_metrics, train

    captions = os.path.join(args.samples, "train", "captions.csv")
    retrieval_json = os.path.join(args.samples, "retrieval", "dataset_samples.json")
    for path in (captions, retrieval_json, args.config):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not found; run from the repository root or pass --samples/--config")
    t0 = time.time()
    data_dir = os.path.join(args.workdir, "data")
    report = build(BuildConfig(csvs=(captions,), out_dir=data_dir))
    m = report.manifest
    print(f"[demo] data: {m['written']} of {m['inputs']} images in {len(m['shards'])} shard(s), "
          f"{m['skipped_count']} skipped -> {data_dir}")

    overrides = [f"--config.data.train={data_dir}", f"--config.evals.retrieval_json={retrieval_json}",
                 f"--config.evals.retrieval_images={os.path.join(args.samples, 'retrieval', 'images')}",
                 *args.overrides]
    config = load_config(args.config, overrides)
    train_dir = os.path.join(args.workdir, "train")
    summary = train(config, train_dir, eval_hooks)
    model_path = os.path.join(args.workdir, "model.safetensors")
    save_checkpoint(model_from_workdir(train_dir), model_path)

    losses = [r["loss"] for r in read_metrics(train_dir)]
    k = max(1, len(losses) // 10)
    split_images = len({i for i in _split_images(retrieval_json)})
    baseline = random_ranking_mean_recall(split_images)
    evals = summary["evals"]
    print(f"\n[demo] trained {config.model.name} for {summary['step']} steps ({summary['ended']}); "
          f"loss {_mean(losses[:k]):.3f} (first {k} logs) -> {_mean(losses[-k:]):.3f} (last {k})")
    print(f"[demo] held-out retrieval on {split_images} images (RemoteCLIP protocol, percent):")
    print("| I->T R@1 | R@5 | R@10 | T->I R@1 | R@5 | R@10 | mean recall | random ranking |")
    print("|---|---|---|---|---|---|---|---|")
    keys = [f"retrieval/{d}_R@{n}" for d in ("image_to_text", "text_to_image") for n in (1, 5, 10)]
    print("| " + " | ".join(f"{evals[key]:.1f}" for key in keys)
          + f" | {evals['retrieval/mean_recall']:.1f} | {baseline:.1f} |")
    print(f"[demo] model (OpenCLIP state_dict): {model_path}; metrics: {train_dir}/metrics.jsonl\n")

    from rsclip_jax.cli import main as rsclip_main

    report = os.path.join(args.workdir, "eval", "report.json")
    rc = rsclip_main(["eval", "--checkpoint", train_dir, "--suite", "remoteclip", "--data-dir", args.samples,
                      "--out", report, "--no-cache"])
    print(f"[demo] evaluation report: {report} (plots in {os.path.join(args.workdir, 'eval', 'report_plots')}); "
          f"{time.time() - t0:.0f}s in all")
    return rc


def _split_images(karpathy_json: str) -> list[str]:
    import json

    with open(karpathy_json, encoding="utf-8") as f:
        return [e["filename"] for e in json.load(f)["images"] if e.get("split") == "test"]
