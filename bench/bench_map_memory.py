"""Peak memory of `rsclip map` on a scene far larger than one strip: the issue's goal is a
20000 x 20000 uint16 3-band GeoTIFF mapped under 2 GB of peak RSS.

    python bench/bench_map_memory.py [--size 20000] [--tile 224] [--stride 224] [--model tiny-ViT]

It writes the synthetic scene once (tiled, deflate; smooth fields plus noise, EPSG:32633, 1 m),
then runs `rsclip map` on it in a fresh process and reads that process's peak RSS from
`getrusage(RUSAGE_CHILDREN)`. The model is random (memory does not depend on its weights). Results
go to bench/results/map_memory.json and .md; docs/performance.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

HERE = os.path.dirname(os.path.abspath(__file__))


def write_scene(path: str, size: int) -> None:
    """A size x size uint16 3-band tiled GeoTIFF, written 512 rows at a time."""
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint16", crs="EPSG:32633",
                   transform=from_origin(300000, 5800000, 1.0, 1.0), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", predictor=2)
    rng = np.random.default_rng(0)
    x = np.linspace(0, 12 * np.pi, size, dtype=np.float32)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, 512):
            h = min(512, size - row)
            y = np.linspace(row, row + h, h, endpoint=False, dtype=np.float32)[:, None] * (12 * np.pi / size)
            for band in range(3):
                field = 2000 + 1500 * np.sin(x[None] * (band + 1) / 3 + y) * np.cos(y * (band + 2) / 4)
                noise = rng.integers(0, 64, (h, size), dtype=np.uint16)
                dst.write((field + noise).astype(np.uint16), band + 1, window=Window(0, row, size, h))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=20000)
    p.add_argument("--tile", type=int, default=224)
    p.add_argument("--stride", type=int, default=224)
    p.add_argument("--model", default="tiny-ViT")
    p.add_argument("--workdir", default=None, help="where the scene and outputs go (default: a temporary folder)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="rsclip_map_bench_")
    os.makedirs(work, exist_ok=True)
    scene = os.path.join(work, f"synthetic_{args.size}.tif")
    if not os.path.exists(scene):
        t = time.time()
        write_scene(scene, args.size)
        print(f"wrote {scene} ({os.path.getsize(scene) / 2**20:.0f} MiB) in {time.time() - t:.0f} s", file=sys.stderr)
    checkpoint = os.path.join(work, f"{args.model}.safetensors")
    subprocess.run([sys.executable, "-m", "rsclip_jax", "init", "--model", args.model, "--out", checkpoint],
                   check=True)
    cmd = [sys.executable, "-m", "rsclip_jax", "map", "--checkpoint", checkpoint, scene,
           "--labels", "forest,farmland,water,residential", "--out", os.path.join(work, "map.tif"),
           "--tile", str(args.tile), "--stride", str(args.stride), "--probs", os.path.join(work, "probs.tif"),
           "--report", os.path.join(work, "report.json")]
    t = time.time()
    subprocess.run(cmd, check=True)
    seconds = time.time() - t
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB (the largest child)
    report = json.load(open(os.path.join(work, "report.json")))
    result = {"size": args.size, "bands": 3, "dtype": "uint16", "tile": args.tile, "stride": args.stride,
              "model": args.model, "tiles": report["tiles"], "seconds": round(seconds, 1),
              "peak_rss_gib": round(peak_gib, 3), "scene_gib_uncompressed": round(args.size**2 * 6 / 2**30, 2),
              "goal_gib": 2.0, "cpu_count": os.cpu_count()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "map_memory.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = ("| scene | tile / stride | tiles | model | peak RSS | wall |\n|---|---|---|---|---|---|\n"
          f"| {args.size} x {args.size} x 3 uint16 ({result['scene_gib_uncompressed']} GiB raw) | "
          f"{args.tile} / {args.stride} | {report['tiles']} | {args.model} | {peak_gib:.2f} GiB | {seconds:.0f} s |\n")
    with open(os.path.join(args.out, "map_memory.md"), "w") as f:
        f.write(md)
    print(md)
    return 0 if peak_gib < 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
