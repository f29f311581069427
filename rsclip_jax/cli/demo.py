"""`rsclip demo`: the README's main job on the bundled sample corpus.

1. `rsclip data build` on `data/samples/train/captions.csv` (real tiles, B2C/M2B captions);
2. `rsclip train --config configs/demo.py`: a tiny CLIP from scratch, with retrieval evals;
3. export the trained model as an OpenCLIP state_dict (`model.safetensors`, architecture recorded);
4. print a short report: the loss curve and held-out retrieval against random ranking;
5. `rsclip eval --suite remoteclip` on the corpus: retrieval, zero-shot, k-NN, linear probe,
   few-shot and counting, with the report tables printed and plots written to `eval/`.

Everything goes under `--workdir`; rerunning resumes or reuses what is already there (a finished
training run is not trained again: its last evaluation is read back from `eval_metrics.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from rsclip_jax.checkpoint import load_checkpoint, save_checkpoint
from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.cli.eval import evaluate_checkpoint
from rsclip_jax.data.build import BuildConfig, build
from rsclip_jax.evaluate.tasks import make_task
from rsclip_jax.evaluate.retrieval import random_ranking_mean_recall
from rsclip_jax.evaluate.suite import ALL_TASKS, discover
from rsclip_jax.train.config import load_config
from rsclip_jax.train.loop import read_metrics, train

DEMO_CONFIG = os.path.join("configs", "demo.py")
# The demo config's retrieval eval, whose metrics the summary table shows.
RETRIEVAL_EVAL = "retrieval"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=COMMAND_HELP["demo"])
    p.add_argument("--workdir", default="runs/demo", help="where shards, checkpoints, metrics and the model go")
    p.add_argument("--samples", default="data/samples", help="the bundled sample corpus (run from the repo root)")
    p.add_argument("--config", default=DEMO_CONFIG, help="training config (default: configs/demo.py)")
    p.set_defaults(func=run_demo, accepts_overrides=True)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def run_demo(args: argparse.Namespace) -> int:
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

    retrieval = f"--config.evals.{RETRIEVAL_EVAL}"
    overrides = [f"--config.data.train={data_dir}", f"{retrieval}.task=retrieval",
                 f"{retrieval}.karpathy_json={retrieval_json}",
                 f"{retrieval}.images={os.path.join(args.samples, 'retrieval', 'images')}", *args.overrides]
    config = load_config(args.config, overrides)
    train_dir = os.path.join(args.workdir, "train")
    summary = train(config, train_dir)
    model_path = os.path.join(args.workdir, "model.safetensors")
    save_checkpoint(load_checkpoint(train_dir), model_path)

    losses = [r["loss"] for r in read_metrics(train_dir)]
    k = max(1, len(losses) // 10)
    split_images = len(_split_images(retrieval_json))
    baseline = random_ranking_mean_recall(split_images)
    # A finished run resumes at its last step and trains nothing: its last evaluation is on disk.
    evals = summary["evals"] or _last_eval(train_dir)
    print(f"\n[demo] trained {config.model.name} for {summary['step']} steps ({summary['ended']}); "
          f"loss {_mean(losses[:k]):.3f} (first {k} logs) -> {_mean(losses[-k:]):.3f} (last {k})")
    print(f"[demo] held-out retrieval on {split_images} images (RemoteCLIP protocol, percent):")
    print("| I->T R@1 | R@5 | R@10 | T->I R@1 | R@5 | R@10 | mean recall | random ranking |")
    print("|---|---|---|---|---|---|---|---|")
    keys = [f"{RETRIEVAL_EVAL}/{d}_R@{n}" for d in ("image_to_text", "text_to_image") for n in (1, 5, 10)]
    keys.append(f"{RETRIEVAL_EVAL}/mean_recall")
    print("| " + " | ".join(f"{evals[key]:.1f}" if key in evals else "n/a" for key in keys) + f" | {baseline:.1f} |")
    print(f"[demo] model (OpenCLIP state_dict): {model_path}; metrics: {train_dir}/metrics.jsonl\n")

    report_path = os.path.join(args.workdir, "eval", "report.json")
    tasks = [make_task(s) for s in discover(args.samples, ALL_TASKS)]
    rc = evaluate_checkpoint(train_dir, tasks, report_path, {"command": {"demo": vars(args).get("workdir")}},
                             cache_dir=None)
    print(f"[demo] evaluation report: {report_path} (plots in {os.path.join(args.workdir, 'eval', 'report_plots')}); "
          f"{time.time() - t0:.0f}s in all")
    return rc


def _last_eval(train_dir: str) -> dict[str, float]:
    """The last record of the run's `eval_metrics.jsonl` (empty if the run never evaluated)."""
    if not os.path.isfile(os.path.join(train_dir, "eval_metrics.jsonl")):
        return {}
    records = read_metrics(train_dir, "eval")
    return records[-1] if records else {}


def _split_images(karpathy_json: str) -> list[str]:
    with open(karpathy_json, encoding="utf-8") as f:
        return [e["filename"] for e in json.load(f)["images"] if e.get("split") == "test"]
