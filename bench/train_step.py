"""The train step side by side with open_clip: same architecture, batch, precision and optimizer.

    python bench/train_step.py --device cpu --model ViT-B-32 --batch 32 --dtype float32
    python bench/train_step.py --device cpu --model ViT-B-32 --batch 32 --dtype bfloat16
    python bench/train_step.py --device gpu --model ViT-L-14 --batch 128 --dtype bfloat16 --torch-compile

Ours is the step `rsclip train` runs, built the same way (`build_run` + `train_step_for` from the
training config `configs/remoteclip.py` selects, so remat, scan, attention and the loss are the
defaults a user gets), on a synthetic batch of uint8 images and token ids (captions of 9 to 40
tokens; ours trims their padding as `rsclip train` does, `--config data.trim_text_multiple=0`
keeps all 77). open_clip's step is
open_clip_train's: forward (autocast bf16 when asked), `ClipLoss`, backward, clip the gradient
norm at 1, AdamW with the same hyper-parameters, clamp the temperature. Both normalise the uint8
images inside the step.

The two run in separate processes (so their thread pools never compete) and alternate A B A B in
one series after warm-up, so machine noise hits both alike; each pair
gives a ratio (open_clip seconds / ours: above 1 means ours is faster) and the table reports their
median. Compile time (ours: `lower().compile()`; open_clip: the warm-up) is reported apart. Model
FLOPs per step come from `rsclip_jax.models.flops` (checked against XLA, tests/test_flops.py); MFU
is printed where the device's peak is known (`--peak-tflops` otherwise).

Writes `<out>/train_step_<device>_<model>_<dtype>_b<batch>.{json,md}`. Performance goals live
here and in docs/performance.md, never in tests. open_clip (and torch) are benchmark-only
dependencies: `pip install -e ".[test]"` has them; `--no-openclip` times ours alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from rsclip_jax.fileio import atomic_write_json, atomic_write_text
from rsclip_jax.hostenv import process_env
from rsclip_jax.models.layers import ATTENTION_IMPLEMENTATIONS

REPO = Path(__file__).resolve().parents[1]
# bench model name -> (configs/remoteclip.py argument, model.name override or None)
MODELS = {
    "ViT-B-32": ("ViT-B-32", None),
    "ViT-B-16": ("ViT-B-32", "ViT-B-16-quickgelu"),
    "ViT-L-14": ("ViT-L-14", None),
    "RN50": ("RN50", None),
    "tiny-ViT": ("ViT-B-32", "tiny-ViT-quickgelu"),  # for --dry-run style smoke runs
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--model", choices=sorted(MODELS), default="ViT-B-32")
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--remat", default=None, help="override both towers' remat policy (default: the config's)")
    p.add_argument("--attention", default=None, choices=ATTENTION_IMPLEMENTATIONS, help="override model.attention")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="more training-config overrides, e.g. --config model.visual_scan=False")
    p.add_argument("--no-openclip", action="store_true", help="time ours only")
    p.add_argument("--torch-compile", action="store_true", help="open_clip under torch.compile (GPU rows)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU where jax's device kind "
                   "is not in the table (rsclip_jax.train.metrics)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON and Markdown")
    p.add_argument("--label", default="", help="appended to the output file names")
    return p.parse_args(argv)


def training_config(args: argparse.Namespace) -> Any:
    """The config `rsclip train --config configs/remoteclip.py:ARCH` builds, with the bench's overrides."""
    from rsclip_jax.train.config import load_config  # after the platform is chosen (see main)

    arch, name = MODELS[args.model]
    overrides = [f"--config.batch_size={args.batch}", f"--config.model.dtype={args.dtype}"]
    if name:
        overrides.append(f"--config.model.name={name}")
    if args.remat:
        overrides += [f"--config.model.visual_remat={args.remat}", f"--config.model.text_remat={args.remat}"]
    if args.attention:
        overrides.append(f"--config.model.attention={args.attention}")
    overrides += [f"--config.{kv}" for kv in args.config]
    return load_config(f"{REPO / 'configs' / 'remoteclip.py'}:{arch}", overrides)


def synthetic_batch(batch: int, image_size: int, context: int, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 images and token rows shaped like real captions: SOT, words, EOT, zero padding."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    tokens = np.zeros((batch, context), np.int32)
    lengths = rng.integers(8, min(40, context - 1), batch)
    for row, n in zip(tokens, lengths):
        row[0], row[1:n], row[n] = 49406, rng.integers(1, 49405, n - 1), 49407
    return {"images": images, "tokens": tokens}


class Ours:
    """rsclip_jax's train step, as `rsclip train` builds it."""

    def __init__(self, config: Any, batch: dict[str, np.ndarray]):
        from rsclip_jax.data.pipeline import to_global_batch, trim_text_padding  # after the platform is chosen
        from rsclip_jax.train.loop import train_step_for
        from rsclip_jax.train.setup import build_run, initial_state

        self.run = build_run(config)
        self.state = initial_state(self.run)
        if config.data.trim_text_multiple:  # as the training loop does with every batch
            batch = trim_text_padding(batch, config.data.trim_text_multiple)
        self.text_tokens = batch["tokens"].shape[1]
        self.batch = to_global_batch(batch, self.run.mesh, self.run.batch_axes)
        t0 = time.perf_counter()
        self.step = train_step_for(self.run).lower(self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - t0
        memory = self.step.memory_analysis()
        self.temp_bytes = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t0


class OpenCLIP:
    """open_clip_train's step on the same architecture (open_clip's own CLIP class)."""

    def __init__(self, config: Any, model_config: Any, batch: dict[str, np.ndarray], device: str,
                 torch_compile: bool):
        import open_clip  # benchmark-only dependency (the test extras)
        import torch

        from rsclip_jax.checkpoint.openclip_dir import openclip_model_cfg

        self.torch = torch
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        model = open_clip.CLIP(**openclip_model_cfg(model_config)).to(self.device).train()
        o = config.optim
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}],
                                           lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
        self.model, self.clip_norm = model, o.grad_clip_norm
        self.loss = open_clip.ClipLoss()
        self.bf16 = config.model.dtype == "bfloat16"
        self.images = torch.from_numpy(batch["images"]).to(self.device)
        self.tokens = torch.from_numpy(batch["tokens"].astype(np.int64)).to(self.device)
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=self.device).view(1, 3, 1, 1)
        self.forward: Callable[..., Any] = torch.compile(model) if torch_compile else model

    def __call__(self) -> float:
        torch = self.torch
        t0 = time.perf_counter()
        images = (self.images.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward(images, self.tokens)
            img, txt, scale = (out["image_features"], out["text_features"], out["logit_scale"]) \
                if isinstance(out, dict) else out[:3]
            loss = self.loss(img, txt, scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, np.log(100))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _side_process(name: str, args: argparse.Namespace, conn: Any) -> None:
    """One side in its own process: build it, then time one step per request from the parent."""
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    from rsclip_jax.train.setup import apply_cpu_dispatch, model_config_from

    config = training_config(args)
    apply_cpu_dispatch(config)  # as `rsclip train` does, before JAX's backend exists
    model_config = model_config_from(config)
    batch = synthetic_batch(args.batch, model_config.vision.image_size, model_config.text.context_length)
    try:
        side: Any = Ours(config, batch) if name == "rsclip_jax" else OpenCLIP(config, model_config, batch,
                                                                               args.device, args.torch_compile)
    except ImportError as e:
        conn.send(("unavailable", str(e)))
        return
    conn.send(("ready", getattr(side, "compile_seconds", None), getattr(side, "temp_bytes", None),
               getattr(side, "text_tokens", model_config.text.context_length)))
    while conn.recv() == "step":
        conn.send(side())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both sides in separate processes, stepped in turn: A B A B.

    Separate processes, because in one process torch's and XLA's thread pools compete (torch's
    OpenMP threads keep spinning after its step) and slow whichever runs second."""
    import multiprocessing

    from rsclip_jax.models.flops import train_step_flops
    from rsclip_jax.train.metrics import peak_flops_per_device
    from rsclip_jax.train.setup import model_config_from

    config = training_config(args)
    model_config = model_config_from(config)
    context = multiprocessing.get_context("spawn")
    names = ["rsclip_jax"] + ([] if args.no_openclip else ["open_clip"])
    pipes, workers, ready = {}, [], {}
    # Both sides start in the environment `rsclip` runs in (malloc on transparent huge pages,
    # rsclip_jax/hostenv.py; RSCLIP_HUGEPAGE_MALLOC=0 for the C library's defaults): ours, because
    # that is the step a user gets; open_clip's, so that the two differ only in the framework.
    side_env = process_env(os.environ)
    for name in names:  # built one after the other, so neither build disturbs the other's compile timing
        parent, child = context.Pipe()
        worker = context.Process(target=_side_process, args=(name, args, child), daemon=True)
        saved_env = dict(os.environ)
        os.environ.update(side_env)  # a spawned process starts with the parent's environment
        try:
            worker.start()
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
        message = parent.recv()
        if message[0] == "unavailable":
            print(f"{name} unavailable ({message[1]}); timing the others only", file=sys.stderr)
            worker.join()
            continue
        pipes[name], ready[name] = parent, message
        workers.append(worker)

    def step(name: str) -> float:
        pipes[name].send("step")
        return pipes[name].recv()

    warm = {name: [step(name) for _ in range(args.warmup)] for name in pipes}
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(args.steps):  # A B A B: noise hits both sides alike
        for name in pipes:
            times[name].append(step(name))
    for name in pipes:
        pipes[name].send("stop")
    for worker in workers:
        worker.join()
    compile_seconds, temp_bytes = ready["rsclip_jax"][1], ready["rsclip_jax"][2]
    flops = train_step_flops(model_config, args.batch)  # at the full context length, as open_clip runs
    # each side's model FLOPs at the width its text tower ran at (ours trims the captions' padding)
    side_flops = {name: train_step_flops(model_config, args.batch, ready[name][3]).total for name in times}
    peak = peak_flops_per_device(args.peak_tflops)
    devices = len(jax.devices())
    result: dict[str, Any] = {
        "model": args.model, "architecture": config.model.name, "batch": args.batch, "dtype": args.dtype,
        "device": jax.devices()[0].device_kind, "devices": devices, "jax": jax.__version__,
        "platform": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "remat": [config.model.visual_remat, config.model.text_remat], "attention": config.model.attention,
        "scan": [config.model.visual_scan, config.model.text_scan],
        "loss": config.loss.name, "loss_chunk_size": config.loss.chunk_size,
        "model_flops_per_step": flops.total, "flops_by_tower": dataclasses.asdict(flops),
        "text_tokens": {name: ready[name][3] for name in times},
        "trim_text_multiple": config.data.trim_text_multiple,
        "compile_seconds": compile_seconds, "temp_bytes": temp_bytes,
        "glibc_tunables": side_env.get("GLIBC_TUNABLES", ""), "cpu_async_dispatch": config.cpu_async_dispatch,
        "sides": {},
    }
    for name, ts in times.items():
        median = statistics.median(ts)
        side = {"median_s": median, "min_s": min(ts), "times_s": ts, "warmup_s": warm[name],
                "samples_per_s": args.batch / median, "model_tflops_per_s": side_flops[name] / median / 1e12}
        if peak:
            side["mfu"] = side_flops[name] / median / (peak * devices)
        result["sides"][name] = side
    if "open_clip" in times:
        ratios = [b / a for a, b in zip(times["rsclip_jax"], times["open_clip"])]
        result["ratios"] = ratios
        result["median_ratio"] = statistics.median(ratios)
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [(f"{r['model']} ({r['architecture']}), batch {r['batch']}, {r['dtype']}, {r['devices']} x {r['device']}, "
              f"jax {r['jax']}, {r['date']}; remat {'/'.join(r['remat'])}, attention {r['attention']}; "
              f"ours compiles in {r['compile_seconds']:.1f} s; both sides with "
              f"GLIBC_TUNABLES={r.get('glibc_tunables') or '(unset)'}; ours with cpu_async_dispatch="
              f"{r.get('cpu_async_dispatch')}; text tokens per caption: "
              + ", ".join(f"{name} {n}" for name, n in r["text_tokens"].items())
              + f" (data.trim_text_multiple={r['trim_text_multiple']})"),
             "", "| side | median s | min s | samples/s | model TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    for name, s in r["sides"].items():
        mfu = f"{100 * s['mfu']:.1f}%" if "mfu" in s else "n/a"
        lines.append(f"| {name} | {s['median_s']:.3f} | {s['min_s']:.3f} | {s['samples_per_s']:.1f} | "
                     f"{s['model_tflops_per_s']:.3f} | {mfu} |")
    if "ratios" in r:
        pairs = ", ".join(f"{x:.2f}" for x in r["ratios"])
        lines += ["", f"open_clip time / rsclip_jax time, per pair: {pairs}; **median {r['median_ratio']:.2f}x** "
                  "(above 1: rsclip_jax is faster)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() != "gpu":
        print(f"--device gpu, but jax's backend is {jax.default_backend()}", file=sys.stderr)
        return 2
    result = run(args)
    text = markdown(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"train_step_{args.device}_{args.model}_{args.dtype}_b{args.batch}{args.label}"
    atomic_write_json(stem.with_suffix(".json"), result)
    atomic_write_text(stem.with_suffix(".md"), text)
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
