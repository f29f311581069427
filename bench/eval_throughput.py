"""Embedding extraction against a pure jitted forward at the same batch (performance issue, item 6).

    python bench/eval_throughput.py                                   # ViT-B-32, batch 64, 512 images
    python bench/eval_throughput.py --model tiny-ViT --batch 16 --images 64 --repeats 1   # a quick check

Both sides run the same compiled image function (`Extractor`'s), on the same devices and batch:

* extraction: `Extractor.images(paths)` over JPEG files on disk (decode, OpenCLIP's resize and
  centre crop on a thread pool, two batches in flight, device transfer, forward, gather), without
  the disk cache;
* pure forward: the same function over batches already on the device, i.e. what the accelerator
  alone needs.

The files are real bundled tiles (data/samples/tiles), re-encoded as JPEG at a typical benchmark
size (256 px, as UC Merced), so decoding costs what it costs in an evaluation. Reports images/s of
each, median of `--repeats` after a warm-up (which compiles), and extraction time / pure time: the
goal is at most 1.10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rsclip_jax.evaluate.embeddings import Extractor  # noqa: E402
from rsclip_jax.fileio import atomic_write_json  # noqa: E402
from rsclip_jax.models import create_model  # noqa: E402


def write_images(folder: Path, n: int, size: int) -> list[str]:
    """n JPEGs cropped from the bundled tiles (distinct crops, so no two files are equal)."""
    tiles = sorted(p for p in (REPO / "data" / "samples" / "tiles").iterdir() if p.is_file())
    paths = []
    for i in range(n):
        with Image.open(tiles[i % len(tiles)]) as im:
            im = im.convert("RGB")
            side = min(im.size)
            x, y = (i * 7) % (im.width - side + 1), (i * 11) % (im.height - side + 1)
            crop = im.crop((x, y, x + side, y + side)).resize((size + i % 5, size), Image.BILINEAR)
        path = folder / f"img{i:05d}.jpg"
        crop.save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="architecture name (default ViT-B-32)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=256, help="side of the JPEG files (default 256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()

    model = create_model(args.model, dtype=args.dtype)
    extractor = Extractor(model, batch_size=args.batch, cache_dir=None, progress=False)
    B = extractor.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images, args.size)
        extractor.images(paths[:B])  # compile
        extract = []
        for _ in range(args.repeats):
            extractor._memo.clear()  # its in-memory memo would answer a repeat without computing
            start = time.perf_counter()
            extractor.images(paths)
            extract.append(time.perf_counter() - start)

    batches = -(-args.images // B)
    s = extractor.image_size
    rng = np.random.default_rng(0)
    xs = [jax.device_put(rng.integers(0, 256, (B, s, s, 3), dtype=np.uint8), extractor._batch) for _ in range(batches)]
    mask = jax.device_put(np.ones(B, bool), extractor._batch)
    jax.block_until_ready(extractor._images_fn(extractor._state, xs[0], mask))
    pure = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = [extractor._images_fn(extractor._state, x, mask) for x in xs]
        jax.block_until_ready(outs)
        pure.append(time.perf_counter() - start)

    e, f = statistics.median(extract), statistics.median(pure)
    result = {"model": args.model, "dtype": args.dtype, "batch": B, "images": args.images, "jpeg_size": args.size,
              "devices": len(jax.devices()), "device_kind": jax.devices()[0].device_kind,
              "extraction_images_per_s": args.images / e, "pure_forward_images_per_s": batches * B / f,
              "ratio": (e / args.images) / (f / (batches * B)), "extract_s": extract, "pure_s": pure}
    print(f"| model | batch | extraction img/s | pure forward img/s | extraction time / pure |\n|---|---|---|---|---|\n"
          f"| {args.model} {args.dtype} | {B} | {result['extraction_images_per_s']:.1f} | "
          f"{result['pure_forward_images_per_s']:.1f} | {result['ratio']:.3f} |")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
