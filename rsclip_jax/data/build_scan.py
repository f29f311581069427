"""`rsclip data build`, stages 2-3: scan every image, then drop test-split leaks and duplicates.

Scan: existence, decompression-bomb check, full decode (so a truncated file fails here and never
in training), conversion to RGB, pHash, in worker processes. Results are cached in
DIR/.build/scan*.jsonl (keyed by path, size, mtime and --max-pixels), so a rerun scans only what
is new; each task of a split build appends to its own file and reads them all.

`--exclude` drops images whose pHash is within the threshold of a test image; `--dedup` drops
later near-duplicates of kept images, in input order (`find_duplicates`, which a split build's
merge runs over every task's images at once).
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

from PIL import Image

from rsclip_jax.data import shards
from rsclip_jax.data.build_inputs import SKIP_NOT_FOUND, BuildConfig, BuildError, InputImage
from rsclip_jax.data.phash import PHashIndex, hash_to_hex, hex_to_hash, phash
from rsclip_jax.preprocess import to_rgb

WORK_DIR = ".build"
_SCAN_VERSION = 1  # bump when scan results change meaning (e.g. the hash), to invalidate caches
_HASH_DRAFT_SIZE = 64  # JPEGs are hashed from a DCT-scaled decode at least this big (pHash uses 32x32)
# What the forkserver imports once: the shard writer, which imports this module and the image stack.
# (A name, not an import: the writer builds on this module.)
_PRELOAD = "rsclip_jax.data.build_write"


def scan_image(path: str, max_pixels: int) -> dict:
    """Validates one image by decoding it fully; returns its metadata and pHash, or a skip reason.

    Never raises for a bad file: every failure becomes {"path", "reason"}.
    """
    try:
        st = os.stat(path)
    except OSError:
        return {"path": path, "reason": SKIP_NOT_FOUND}
    entry = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "max_pixels": max_pixels,
             "scan_version": _SCAN_VERSION}
    if st.st_size == 0:
        return {**entry, "reason": "cannot decode: empty file (0 bytes)"}
    try:
        with shards.open_checked(path, max_pixels) as img:
            meta = {"format": img.format, "mode": img.mode, "width": img.width, "height": img.height}
            if img.format == "JPEG":
                # DCT scaling still entropy-decodes the whole file, so truncation is caught too.
                img.draft("RGB", (_HASH_DRAFT_SIZE, _HASH_DRAFT_SIZE))
            img.load()
            value = phash(to_rgb(img))
    except (shards.DecompressionBomb, Image.DecompressionBombError) as e:  # ours, or PIL's 2x global limit
        return {**entry, "reason": f"decompression bomb: {e}"}
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; none may stop a build
        return {**entry, "reason": f"cannot decode: {type(e).__name__}: {e}"}
    return {**entry, **meta, "phash": hash_to_hex(value)}


def parallel_map(fn: Callable, items: Sequence, workers: int, ordered: bool = True) -> Iterator:
    """map() over worker processes; in-process when workers <= 1 (no pickling, easy to debug).

    `fn` must be a module-level function (workers unpickle it by name).
    """
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    # forkserver: forking a parent that has started threads (jax, grain) is unsafe. Preloading
    # the job's module in the server makes each worker start in milliseconds instead of re-importing.
    # An executor (unlike multiprocessing.Pool) fails loudly if a worker dies.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([_PRELOAD])
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(items)), mp_context=ctx) as pool:
        if ordered:
            yield from pool.map(fn, items, chunksize=max(1, min(64, len(items) // (workers * 8))))
        else:
            futures = [pool.submit(fn, item) for item in items]
            for future in concurrent.futures.as_completed(futures):
                yield future.result()


def _scan_job(args: tuple[str, int]) -> dict:
    return scan_image(*args)


def scan_cache_name(label: str) -> str:
    """The scan cache file one task appends to: scan.jsonl, or scan.<task label>.jsonl."""
    return f"scan.{label}.jsonl" if label else "scan.jsonl"


def scan_all(paths: Iterable[str], config: BuildConfig, log: Callable[[str], None], label: str = "") -> dict[str, dict]:
    """Scan results for `paths`, reusing cached entries (any task's) whose file is unchanged."""
    work = os.path.join(config.out_dir, WORK_DIR)
    cached: dict[str, dict] = {}
    for cache_file in sorted(glob.glob(os.path.join(glob.escape(work), "scan*.jsonl"))):
        with open(cache_file, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    cached[entry["path"]] = entry
                except ValueError:  # a line cut short by an interruption (or still being written)
                    continue
    results: dict[str, dict] = {}
    todo = []
    for path in dict.fromkeys(paths):
        entry = cached.get(path)
        try:
            st = os.stat(path)
        except OSError:
            results[path] = {"path": path, "reason": SKIP_NOT_FOUND}
            continue
        key = (st.st_size, st.st_mtime_ns, config.max_pixels, _SCAN_VERSION)
        if entry and (entry["size"], entry["mtime_ns"], entry["max_pixels"], entry.get("scan_version")) == key:
            results[path] = entry
        else:
            todo.append(path)
    log(f"scanning {len(todo)} images ({len(results)} cached or missing)")
    if not todo:
        return results
    # Appended line by line as results arrive: an interruption loses at most the line in flight.
    with open(os.path.join(work, scan_cache_name(label)), "a", encoding="utf-8") as cache:
        for entry in parallel_map(_scan_job, [(p, config.max_pixels) for p in todo], config.workers):
            results[entry["path"]] = entry
            if entry.get("reason") != SKIP_NOT_FOUND:
                cache.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return results


def exclude_leakage(candidates: list[tuple[InputImage, dict]], tests: list[tuple[str, str]], scans: dict[str, dict],
                    config: BuildConfig) -> tuple[list[tuple[InputImage, dict]], list[tuple[InputImage, str]], dict]:
    """Applies --exclude against the scanned `tests` images: (kept, skipped with reasons, manifest section)."""
    if not config.exclude:
        return candidates, [], {}
    leak_index = PHashIndex(config.phash_threshold)
    missing = []
    for path, label in tests:
        if "phash" in scans[path]:
            leak_index.add(hex_to_hash(scans[path]["phash"]), label)
        else:
            missing.append({"path": path, "reason": scans[path]["reason"]})
    if tests and not len(leak_index):
        raise BuildError(f"none of the {len(tests)} excluded-split images could be read (first: {missing[0]}); "
                         "point --exclude-images at the folder that holds them")
    info = {"jsons": list(config.exclude), "splits": list(config.exclude_splits), "test_images": len(tests),
            "test_images_unreadable": missing, "removed": 0}
    kept, skipped = [], []
    for img, scan in candidates:
        leak = leak_index.matches(hex_to_hash(scan["phash"]))
        if leak:
            label, d = min(leak, key=lambda m: m[1])
            skipped.append((img, f"test-split leakage: near-duplicate of {label} (phash distance {d})"))
            info["removed"] += 1
        else:
            kept.append((img, scan))
    return kept, skipped, {"exclude": info}


def find_duplicates(items: Sequence[tuple[str, str, str]], threshold: int, scope: str) -> dict[int, str]:
    """--dedup over (source, original id, pHash hex) in input order: {index: reason} of every item
    that near-duplicates an earlier *kept* one (of another source, unless `scope` is "all")."""
    index = PHashIndex(threshold)
    removed = {}
    for k, (source, original_id, hex_hash) in enumerate(items):
        value = hex_to_hash(hex_hash)
        dups = [(o, d) for o, d in index.matches(value) if scope == "all" or o[0] != source]
        if dups:
            (other_source, other_id), d = dups[0]
            removed[k] = f"duplicate of {other_source}:{other_id} (phash distance {d})"
        else:
            index.add(value, (source, original_id))
    return removed
