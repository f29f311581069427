"""Input-pipeline benchmark: decode + augment throughput per core, and the full grain pipeline.

Builds shards from the bundled sample tiles (data/samples/tiles, each copied under several names so
that batches mix many records) into a temporary folder, three ways: the files as they are (RGB
PNG/JPEG kept, TIFFs re-encoded to JPEG), and re-encoded with `--image-size 256` and `224`
(JPEG q95, shorter side <= S). Then it measures, on one thread, images per second of

  * raw decode: ArrayRecord read + PIL decode to RGB, nothing else;
  * decode + augment: the training pipeline's per-record work (read, decode, RandomResizedCrop to
    224 px, flips and 90° rotations, caption choice), bicubic (the default) and bilinear;

and the full grain training pipeline (batches of 64 with tokenization) with the given thread and
worker settings, without shuffling (see the shuffle cost line). Each figure is the best of --repeats runs (the machine is shared and noisy).

    python bench/bench_pipeline.py                 # print the table
    python bench/bench_pipeline.py --update-docs   # also rewrite the table in docs/performance.md
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain
import numpy as np
import PIL
from PIL import Image, features

from rsclip_jax.data import pipeline, shards
from rsclip_jax.data.augment import AugmentConfig
from rsclip_jax.data.build import BuildConfig, build

DOCS = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- bench_pipeline:begin -->", "<!-- bench_pipeline:end -->"


def build_variants(tmp: Path, copies: int) -> dict[str, list[str]]:
    """Shard paths per storage variant, built with `rsclip data build`'s code."""
    images = tmp / "images"
    images.mkdir()
    with open(images / "tiles.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for tile in sorted((REPO / "data" / "samples" / "tiles").iterdir()):
            for c in range(copies):
                name = f"{tile.stem}_{c}{tile.suffix}"
                shutil.copy(tile, images / name)
                writer.writerow([name, f"a remote sensing image of {tile.stem.replace('_', ' ')}"])
    variants = {}
    for label, size in (("as built (PNG/JPEG 200-600 px)", None), ("--image-size 256 (JPEG)", 256),
                        ("--image-size 224 (JPEG)", 224)):
        out = tmp / f"shards_{size}"
        build(BuildConfig(csvs=(str(images / "tiles.csv"),), out_dir=str(out), image_size=size, workers=1))
        variants[label] = shards.shard_paths(out)
    return variants


def best_rate(fn, count: int, repeats: int) -> float:
    """Best items/s over `repeats` runs of fn() producing `count` items."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = max(best, count / (time.perf_counter() - start))
    return best


def raw_decode_rate(paths: list[str], n: int, repeats: int) -> float:
    source = grain.sources.ArrayRecordDataSource(paths)

    def run() -> None:
        for i in range(n):
            data = source[i % len(source)]
            _, start = shards.decode_header(data)
            with Image.open(io.BytesIO(data[start:])) as img:
                img.convert("RGB").load()

    return best_rate(run, n, repeats)


def augment_rate(paths: list[str], augment: AugmentConfig, n: int, repeats: int) -> float:
    examples = pipeline.train_examples(paths, seed=0, shuffle=False, augment=augment,
                                       shard_options=grain.sharding.NoSharding())
    return best_rate(lambda: [examples[i] for i in range(n)], n, repeats)


def pipeline_rate(paths: list[str], loader: pipeline.LoaderConfig, batches: int, repeats: int) -> float:
    ds = pipeline.train_dataset(paths, batch_size=64, seed=0, shuffle=False,
                                shard_options=grain.sharding.NoSharding(), loader=loader)
    it = iter(ds)
    next(it)  # start threads/workers, build the tokenizer
    rate = best_rate(lambda: [next(it) for _ in range(batches)], batches * 64, repeats)
    if loader.worker_count:
        it.close()
    return rate


def shuffle_cost_us(sizes: tuple[int, ...] = (56, 1_000, 100_000)) -> dict[int, float]:
    """Microseconds per index of grain's shuffle (`MapDataset.shuffle`) at several dataset sizes."""
    out = {}
    for n in sizes:
        keys = grain.MapDataset.range(n).shuffle(seed=0)
        out[n] = 1e6 / best_rate(lambda keys=keys: [keys[i] for i in range(200)], 200, 3)
    return out


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import jax

    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, Pillow {PIL.__version__} "
            f"(libjpeg-turbo {features.version('jpg')}), numpy {np.__version__}, grain {grain.__version__}, "
            f"jax {jax.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8, help="copies of each sample tile (default 8 -> 56 records)")
    parser.add_argument("--images", type=int, default=600, help="images per single-thread measurement")
    parser.add_argument("--batches", type=int, default=8, help="batches of 64 per pipeline measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--update-docs", action="store_true", help=f"rewrite the table in {DOCS.relative_to(REPO)}")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(Path(tmp), args.copies)
        for label, paths in variants.items():
            raw = raw_decode_rate(paths, args.images, args.repeats)
            bicubic = augment_rate(paths, AugmentConfig(), args.images, args.repeats)
            bilinear = augment_rate(paths, AugmentConfig(interpolation="bilinear"), args.images, args.repeats)
            rows.append(f"| {label} | {raw:,.0f} | {bicubic:,.0f} | {bilinear:,.0f} |")
            print(rows[-1], file=sys.stderr, flush=True)  # progress; the table below is the output
        paths = variants["--image-size 256 (JPEG)"]
        loader_rows = []
        for loader in (pipeline.LoaderConfig(read_threads=0), pipeline.LoaderConfig(read_threads=1),
                       pipeline.LoaderConfig(read_threads=2), pipeline.LoaderConfig(worker_count=2, read_threads=1)):
            rate = pipeline_rate(paths, loader, args.batches, args.repeats)
            settings = ", ".join(f"{f.name}={getattr(loader, f.name)}" for f in dataclasses.fields(loader)
                                 if f.name in ("worker_count", "read_threads"))
            loader_rows.append(f"| {settings} | {rate:,.0f} |")
            print(loader_rows[-1], file=sys.stderr, flush=True)

    shuffle = shuffle_cost_us()
    table = "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.",
        (f"Command: `python bench/bench_pipeline.py --copies {args.copies} --images {args.images} "
         f"--batches {args.batches} --repeats {args.repeats}` (best of {args.repeats})."),
        "",
        "Single thread, images/s at 224 px (one core):",
        "",
        "| stored images | raw decode | decode + augment, bicubic | decode + augment, bilinear |",
        "|---|---|---|---|",
        *rows,
        "",
        ("Full training pipeline (batches of 64 incl. tokenization, `--image-size 256` shards, whole machine), "
         "images/s:"),
        "",
        "| LoaderConfig | images/s |",
        "|---|---|",
        *loader_rows,
        "",
        "These runs do not shuffle: grain's index shuffle costs "
        + ", ".join(f"{us:,.0f} µs per record at {n:,} records" for n, us in shuffle.items())
        + " (it is only expensive for tiny datasets such as these 56 records).",
    ])
    print("\n" + table)
    if args.update_docs:
        text = DOCS.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOCS.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
