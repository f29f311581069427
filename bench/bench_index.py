"""Search-index benchmark: recall@10 of approximate indexes against the exact one, build and query
times, and memory, on a synthetic 100k x 512 set of unit vectors with cluster structure.

The set imitates CLIP image embeddings of an archive: 1000 clusters with Zipf-distributed sizes
(a few big classes, many small ones), each with its own spread, around a shared mean direction
(CLIP embeddings are anisotropic). Queries are held out (never in the index): half are new samples
of the same clusters ("more like this"), half are cluster centres moved by one shared offset plus
noise, as text queries sit apart from image embeddings (the modality gap).

Each configuration runs in its own process, so its peak memory is its own (reported as the peak RSS
above the process's RSS after generating the data). Compared:

  * faiss exact (IndexFlatIP over all rows): the ground truth, and its single-query latency;
  * faiss IVF-Flat (what `rsclip index --kind approx` builds), with nprobe calibrated as the index
    builder does (on separate calibration queries), and a sweep of nprobe;
  * faiss HNSW-Flat (M 32) and usearch HNSW (connectivity 32, f32 and f16), sweeps of ef;
  * searcher-exact / searcher-approx: the set written as one index shard by rsclip's own code
    (`index_store.write_shard`, synthetic file records) and queried through `Searcher.search_vector`
    for 50 hits: the whole query path, metadata (Parquet) included.

    python bench/bench_index.py                     # 100k x 512, writes bench/results/index.{json,md}
    python bench/bench_index.py --n 20000 --quick   # a smaller, faster run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from rsclip_jax.apps.index_vectors import build_ivf, calibrate_nprobe, exact_search, recall_at_k  # noqa: E402
from rsclip_jax.apps import index_store  # noqa: E402
from rsclip_jax.apps.search import Searcher  # noqa: E402
from rsclip_jax.fileio import atomic_write_json, atomic_write_text  # noqa: E402

CONFIGS = ["faiss-exact", "faiss-ivf", "faiss-hnsw", "usearch-hnsw-f32", "usearch-hnsw-f16", "searcher-exact",
           "searcher-approx"]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def dataset(n: int, d: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base (n, d), held-out queries (queries, d), calibration queries (256, d)), all unit float32."""
    rng = np.random.default_rng(seed)
    clusters = 1000
    mean = unit(rng.standard_normal(d)).astype(np.float32)
    centres = unit(0.6 * mean + unit(rng.standard_normal((clusters, d)))).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
    weights /= weights.sum()
    spread = rng.uniform(0.8, 1.6, clusters).astype(np.float32)
    gap = unit(rng.standard_normal(d)).astype(np.float32)

    def images(m: int) -> np.ndarray:
        c = rng.choice(clusters, m, p=weights)
        return unit(centres[c] + spread[c, None] * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d))

    def texts(m: int) -> np.ndarray:
        c = rng.choice(clusters, m, p=weights)
        return unit(centres[c] + 0.6 * gap + 0.5 * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d))

    base = images(n).astype(np.float32)
    q = np.concatenate([images(queries // 2), texts(queries - queries // 2)]).astype(np.float32)
    calib = np.concatenate([images(128), texts(128)]).astype(np.float32)
    return base, q, calib


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_one(name: str, n: int, d: int, queries: int, quick: bool) -> dict:
    """Builds and queries one configuration; returns its measurements (run in a child process)."""
    base, q, calib = dataset(n, d, queries)
    _, truth = exact_search(base, q, 10)
    rss0 = rss_mb()
    reset_peak()  # the data's own temporaries are not the index's memory
    out: dict = {"config": name}
    single = q[:50]

    def query_times(search) -> dict:
        t_batch, (_, ids) = timed(lambda: search(q), repeats=3)  # best of 3: the machine may be shared
        t_single, _ = timed(lambda: [search(single[i:i + 1]) for i in range(len(single))], repeats=3)
        return {"recall_at_10": round(recall_at_k(ids, truth), 4),
                "batch_ms_per_query": round(1e3 * t_batch / len(q), 4),
                "single_query_ms": round(1e3 * t_single / len(single), 3)}

    if name == "faiss-exact":
        t_build, index = timed(lambda: (lambda ix: (ix.add(base), ix)[1])(faiss.IndexFlatIP(d)))
        out.update(build_s=round(t_build, 2), **query_times(lambda x: index.search(x, 10)))
        out["blocked_scan_single_query_ms"] = round(
            1e3 * timed(lambda: [exact_search(base, single[i:i + 1], 10) for i in range(len(single))], 2)[0]
            / len(single), 3)
    elif name == "faiss-ivf":
        t_build, index = timed(lambda: build_ivf(base))
        t_cal, (nprobe, cal_recall) = timed(lambda: calibrate_nprobe(index, base, calib))
        index.nprobe = nprobe
        out.update(build_s=round(t_build, 2), calibrate_s=round(t_cal, 2), nlist=int(index.nlist), nprobe=nprobe,
                   calibration_recall=round(cal_recall, 4), **query_times(lambda x: index.search(x, 10)))
        sweep = {}
        for p in (4, 8, 16, 32, 64):
            index.nprobe = p
            sweep[p] = query_times(lambda x: index.search(x, 10))
        out["sweep_nprobe"] = sweep
    elif name == "faiss-hnsw":
        def build():
            ix = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            ix.hnsw.efConstruction = 64 if quick else 128
            ix.add(base)
            return ix
        t_build, index = timed(build)
        out["build_s"] = round(t_build, 2)
        sweep = {}
        for ef in (16, 32, 64, 128):
            index.hnsw.efSearch = ef
            sweep[ef] = query_times(lambda x: index.search(x, 10))
        out["sweep_ef"] = sweep
    elif name.startswith("usearch-hnsw"):
        from usearch.index import Index  # optional: not an rsclip dependency, compared when installed

        dtype = name.rsplit("-", 1)[1]

        def build():
            ix = Index(ndim=d, metric="ip", dtype=dtype, connectivity=32, expansion_add=64 if quick else 128)
            ix.add(np.arange(n), base)
            return ix
        t_build, index = timed(build)
        out["build_s"] = round(t_build, 2)
        sweep = {}
        for ef in (16, 32, 64, 128):
            index.expansion_search = ef
            sweep[ef] = query_times(lambda x: (None, index.search(x, 10).keys.reshape(len(x), -1)))
        out["sweep_ef"] = sweep
    elif name.startswith("searcher"):
        kind = name.split("-")[1]
        records = [index_store.Record(item=f"/archive/tile_{i:06d}.png", path=f"/archive/tile_{i:06d}.png")
                   for i in range(n)]
        with tempfile.TemporaryDirectory() as tmp:
            def build():
                entry = index_store.write_shard(tmp, "shard-00000-bench", base, records, 0, kind)
                index_store.write_manifest(tmp, {"format": index_store.FORMAT, "version": index_store.VERSION,
                                                 "embed_dim": d, "checkpoint": "none", "shards": [entry]})
                return entry
            t_build, entry = timed(build)
            searcher = Searcher(tmp)
            out.update(build_s=round(t_build, 2), **{k: entry[k] for k in ("nprobe", "nlist") if k in entry})
            out.update(query_times(lambda x: (None, np.stack([[h.id for h in searcher.search_vector(v, 10)]
                                                               for v in x]))))
            t50, _ = timed(lambda: [searcher.search_vector(single[i], 50) for i in range(len(single))], repeats=2)
            out["single_query_50_hits_ms"] = round(1e3 * t50 / len(single), 3)
            files = [f for f in Path(tmp, entry["name"]).iterdir()]
            out["shard_files_mb"] = {f.name: round(f.stat().st_size / 2**20, 1) for f in files}
    else:
        raise ValueError(name)
    out["memory_mb"] = round(peak_mb() - rss0, 1)
    if name.startswith("searcher"):
        out["index_file_mb"] = round(sum(out["shard_files_mb"].values()), 1)
    elif name.startswith("faiss"):
        out["index_file_mb"] = round(faiss.serialize_index(index).nbytes / 2**20, 1)
    else:
        out["index_file_mb"] = round(len(index.save()) / 2**20, 1)
    return out


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Synthetic set: {s['n']:,} x {s['d']} unit vectors, 1000 Zipf-sized clusters; {s['queries']} held-out "
             f"queries (half image-like, half text-like); {s['machine']}.", "",
             "| index | build (s) | recall@10 | ms/query (batch of queries) | ms/query (one at a time) "
             "| peak memory (MB) | file (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} | | | | | |")
            continue
        if "sweep_ef" in r:
            for ef, q in r["sweep_ef"].items():
                lines.append(f"| {r['config']} ef {ef} | {r['build_s']} | {q['recall_at_10']} "
                             f"| {q['batch_ms_per_query']} | {q['single_query_ms']} | {r['memory_mb']} "
                             f"| {r['index_file_mb']} |")
            continue
        label = r["config"]
        if "nprobe" in r:
            label += f" (nlist {r['nlist']}, calibrated nprobe {r['nprobe']})"
        build = r["build_s"] + r.get("calibrate_s", 0)
        lines.append(f"| {label} | {round(build, 2)} | {r['recall_at_10']} | {r['batch_ms_per_query']} "
                     f"| {r['single_query_ms']} | {r['memory_mb']} | {r['index_file_mb']} |")
        for p, q in r.get("sweep_nprobe", {}).items():
            lines.append(f"| faiss-ivf nprobe {p} | | {q['recall_at_10']} | {q['batch_ms_per_query']} "
                         f"| {q['single_query_ms']} | | |")
    for r in result["runs"]:
        if r["config"].startswith("searcher") and "error" not in r:
            lines.append(f"| {r['config']}: rsclip's query path, 50 hits with metadata | | | "
                         f"| {r['single_query_50_hits_ms']} | | |")
    ex = next((r for r in result["runs"] if r["config"] == "faiss-exact" and "error" not in r), None)
    if ex:
        lines += ["", f"Exact search as `rsclip search` runs it (memory-mapped embeddings scanned in blocks): "
                      f"{ex['blocked_scan_single_query_ms']} ms per single query."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--quick", action="store_true", help="cheaper HNSW construction")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for index.json and index.md")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: run one config, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.n, args.d, args.queries, args.quick)))
        return 0
    runs = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--n", str(args.n), "--d", str(args.d),
               "--queries", str(args.queries)] + (["--quick"] if args.quick else [])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            runs.append({"config": name, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    try:
        import usearch  # optional, as above

        usearch_version = usearch.__version__
    except ImportError:
        usearch_version = None
    result = {"settings": {"n": args.n, "d": args.d, "queries": args.queries, "quick": args.quick,
                           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                           "faiss": faiss.__version__, "usearch": usearch_version},
              "runs": runs}
    out = Path(args.out)
    atomic_write_json(out / "index.json", result)
    atomic_write_text(out / "index.md", to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
