"""`rsclip eval`: zero-shot, linear probe, k-NN, few-shot, retrieval and counting, with reports.

    rsclip eval --checkpoint CKPT --task retrieval --karpathy-json FILE --images DIR --out report.json
    rsclip eval --checkpoint CKPT --task zeroshot --task knn --scenes DIR --out report.json
    rsclip eval --checkpoint CKPT --task knn --scenes tfds:PREPARED_DIR --out report.json   (rsclip data tfds)
    rsclip eval --checkpoint CKPT --suite remoteclip --data-dir data/samples --out runs/eval/report.json
    rsclip eval --suite remoteclip-paper --weights-dir WEIGHTS --data-dir DATA --out paper/report.json

Writes the JSON report (--out), the Markdown tables (printed, and saved beside it as .md) and the
PNG plots (<out stem>_plots/). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax

from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.cli.common import CHECKPOINT_HELP, MODEL_HELP, add_checkpoint_choice_args, check_output_path, positive_int
from rsclip_jax.checkpoint import load_tokenizer
from rsclip_jax.evaluate.embeddings import default_cache_dir
from rsclip_jax.evaluate.models import load_model
from rsclip_jax.evaluate.paper import run_paper_suite
from rsclip_jax.evaluate.plots import plot_all
from rsclip_jax.evaluate.registry import Task
from rsclip_jax.evaluate.tasks import make_task
from rsclip_jax.evaluate.report import build_report, markdown, paper_numbers, write_json
from rsclip_jax.evaluate.suite import ALL_TASKS, SCENE_TASKS, Evaluator, discover
from rsclip_jax.fileio import atomic_write_text
from rsclip_jax.train.distributed import add_distributed_args, init_distributed

SUITES = ("remoteclip", "remoteclip-paper")
TASK_CHOICES = ("zeroshot", "linear_probe", "knn", "fewshot", "retrieval", "counting")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help=COMMAND_HELP["eval"],
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    g.add_argument("--model", default=None, help=MODEL_HELP)
    add_checkpoint_choice_args(g)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--batch-size", type=positive_int, default=64, help="global batch, split over every device")
    g = p.add_argument_group("what to run")
    g.add_argument("--task", action="append", choices=TASK_CHOICES, help="repeatable; with --suite, restricts it")
    g.add_argument("--suite", choices=SUITES, help="every task on a --data-dir layout (paper: also --weights-dir)")
    g.add_argument("--data-dir", help="suite data: retrieval/, scenes/, counting/ (docs/evaluation.md)")
    g.add_argument("--weights-dir", help="remoteclip-paper: folder of released checkpoints")
    g = p.add_argument_group("task data")
    g.add_argument("--scenes", help="folder-per-class scene dataset (zeroshot, linear_probe, knn, fewshot), or "
                   "tfds:DIR, a scene dataset prepared by `rsclip data tfds` (docs/tfds.md)")
    g.add_argument("--dataset-name", default=None, help="name of --scenes (selects bundled class names, e.g. AID)")
    g.add_argument("--karpathy-json", help="retrieval: Karpathy-format dataset_*.json, or tfds:DIR, a Karpathy "
                   "dataset prepared by `rsclip data tfds` (then no --images)")
    g.add_argument("--images", help="retrieval: image folder (default: images/ beside the JSON)")
    g.add_argument("--split", default="test", help="retrieval: Karpathy split")
    g.add_argument("--counting-json", help="counting: JSON (docs/evaluation.md)")
    g.add_argument("--counting-images", help="counting: image folder (default: images/ beside the JSON)")
    g = p.add_argument_group("task options (defaults: docs/evaluation.md)")
    g.add_argument("--templates", default=None, help="zeroshot: template file, one per line with {}")
    g.add_argument("--classnames", default=None, help="zeroshot: JSON {folder: class name} overrides")
    g.add_argument("--zeroshot-split", default=None, choices=["test", "all"], help="zeroshot: images scored (test)")
    g.add_argument("--k", type=positive_int, default=None, help="knn: neighbours (20)")
    g.add_argument("--temperature", type=float, default=None, help="knn: vote temperature (0.07)")
    g.add_argument("--shots", default=None, help="fewshot: comma-separated n (1,2,4,8,16,32)")
    g.add_argument("--seeds", default=None, help="fewshot: comma-separated seeds (0,1,2)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/eval/report.json", help="JSON report; .md and _plots/ are written beside it")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/rsclip_jax/embeddings)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write cached embeddings")
    g.add_argument("--skip-missing", action="store_true",
                   help="skip and count missing/unreadable images and empty class folders instead of stopping")
    add_distributed_args(p.add_argument_group("multi-process (as rsclip train)"))
    p.set_defaults(func=run_eval)


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"{flag} takes comma-separated non-negative integers, got {text!r}")
    return values


def task_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per-task options the user set (unset ones keep the tasks' documented defaults)."""
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
    return {
        "zeroshot": given(templates=args.templates, classnames=args.classnames, split=args.zeroshot_split),
        "knn": given(k=args.k, temperature=args.temperature),
        "fewshot": given(shots=_ints(args.shots, "--shots"), seeds=_ints(args.seeds, "--seeds")),
    }


def task_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Specs for `--task` runs without a suite; checks that each task has its data."""
    options, specs = task_options(args), []
    for task in dict.fromkeys(args.task):
        if task in SCENE_TASKS:
            if not args.scenes:
                raise ValueError(f"--task {task} needs --scenes DIR (a folder per class)")
            spec = {"task": task, "root": args.scenes, "name": args.dataset_name or ""}
        elif task == "retrieval":
            if not args.karpathy_json:
                raise ValueError("--task retrieval needs --karpathy-json FILE (and --images DIR)")
            spec = {"task": task, "karpathy_json": args.karpathy_json, "images": args.images, "split": args.split}
        else:
            if not args.counting_json:
                raise ValueError("--task counting needs --counting-json FILE")
            spec = {"task": task, "json": args.counting_json, "images": args.counting_images}
        specs.append({**spec, **options.get(task, {}), "skip_missing": args.skip_missing})
    return specs


def run_eval(args: argparse.Namespace) -> int:
    if not args.suite and not args.task:
        raise ValueError("give --task TASK (repeatable) or --suite remoteclip|remoteclip-paper")
    if args.suite and not args.data_dir:
        raise ValueError(f"--suite {args.suite} needs --data-dir DIR")
    if args.suite == "remoteclip-paper" and not args.weights_dir:
        raise ValueError("--suite remoteclip-paper needs --weights-dir DIR: a folder of the released checkpoints "
                         "(.pt/.pth/.bin/.safetensors, e.g. RemoteCLIP-ViT-B-32.pt; see docs/evaluation.md)")
    if args.suite == "remoteclip-paper" and (args.checkpoint or args.step is not None or args.best):
        raise ValueError("--suite remoteclip-paper evaluates every checkpoint of --weights-dir; --checkpoint, "
                         "--step and --best do not apply to it")
    if args.suite != "remoteclip-paper" and not args.checkpoint:
        raise ValueError("--checkpoint is required (a weights file or an rsclip training workdir)")
    check_output_path(args.out, "--out")  # before any model loads or embeds
    init_distributed(args)  # under `rsclip launch`, beats in the background from here on (no steps to beat at)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    config: dict[str, Any] = {"command": {k: v for k, v in vars(args).items() if k != "func"},
                              "cache_dir": cache_dir, "devices": jax.device_count(), "processes": jax.process_count(),
                              "jax": jax.__version__}
    tasks = tuple(args.task) if args.task else None
    if args.suite == "remoteclip-paper":
        results, info = run_paper_suite(args.weights_dir, args.data_dir, tasks or ALL_TASKS, args.batch_size, cache_dir,
                                        args.skip_missing, args.dtype, task_options(args))
        config.update(info)
        return write_report(args.out, results, config, paper_numbers(), "RemoteCLIP paper tables", not args.no_plots)
    if args.suite:
        specs = discover(args.data_dir, tasks or ALL_TASKS, task_options(args), args.skip_missing)
    else:
        specs = task_specs(args)
    tasks_to_run = [make_task(s) for s in specs]  # option errors before the model loads
    return evaluate_checkpoint(args.checkpoint, tasks_to_run, args.out, config, model=args.model, dtype=args.dtype,
                               step=args.step, best=args.best, batch_size=args.batch_size, cache_dir=cache_dir,
                               plots=not args.no_plots)


def evaluate_checkpoint(checkpoint: str, tasks: list[Task], out: str, config: dict[str, Any], *,
                        model: str | None = None, dtype: str = "float32", step: int | None = None, best: bool = False,
                        batch_size: int = 64, cache_dir: str | None = None, plots: bool = True) -> int:
    """Loads a checkpoint, runs the tasks and writes the report (JSON, Markdown, plots) at `out`."""
    clip, info = load_model(checkpoint, model, dtype, step=step, best=best)
    tokenizer = load_tokenizer(checkpoint, info["format"])
    info["tokenizer"] = tokenizer.describe()
    label = os.path.splitext(os.path.basename(os.path.normpath(checkpoint)))[0]
    where = f", step {info['step']}" if "step" in info else ""
    print(f"[eval] {label}: {info['model']} ({info['format']}{where}); tokenizer: {info['tokenizer']}",
          file=sys.stderr)
    evaluator = Evaluator(tasks, batch_size, cache_dir=cache_dir, verbose=True, tokenizer=tokenizer)
    results = evaluator.results(clip, label)
    config["model"] = {**info, "label": label, "fingerprint": evaluator.extractor.fingerprint}
    return write_report(out, results, config, None, f"Evaluation of {label}", plots)


def write_report(out: str, results: list, config: dict[str, Any], paper: dict | None, title: str,
                 plots: bool = True) -> int:
    """The report of `results`: JSON at `out`, Markdown beside it (and printed), plots in `<stem>_plots/`."""
    text = markdown(results, paper, title)
    if jax.process_index() != 0:
        return 0
    write_json(build_report(results, config), out)
    stem = os.path.splitext(out)[0]
    atomic_write_text(stem + ".md", text)
    print(text)
    written = [out, stem + ".md"]
    if plots:
        written += plot_all(results, stem + "_plots")
    print("wrote " + ", ".join(written), file=sys.stderr)
    return 0
