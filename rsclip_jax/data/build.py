"""`rsclip data build`: caption CSVs -> ArrayRecord shards + manifest.json.

Stages, each accounting for every input (written + skipped == inputs, always):
1. Read the CSVs (OpenCLIP style `filepath,title`, one row per caption) and group rows by
   filepath: one input image per (source, filepath). Empty captions are dropped; an image left
   without a caption is skipped ("empty caption").
2. Scan every image in worker processes: existence, decompression-bomb check, full decode (so
   a truncated file fails here and never in training), conversion to RGB, pHash. Scan results
   are cached in DIR/.build/scan.jsonl (keyed by path, size and mtime), so a rerun scans only
   what is new.
3. `--exclude`: drop images whose pHash is within the threshold of a test image of the given
   Karpathy JSON splits. `--dedup`: drop later near-duplicates of kept images, in input order.
4. Assign the surviving images, in input order, to shards of `records_per_shard`. Each shard is
   written by one worker to a temporary file, renamed into place, and then marked done by an
   atomically written DIR/.build/<shard>.done.json holding the digest of its task. A rerun
   recomputes the same plan and skips every shard whose marker digest matches.
5. Write DIR/manifest.json from the markers.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence

from PIL import Image

from rsclip_jax.data import shards
from rsclip_jax.data.phash import PHashIndex, hash_to_hex, hex_to_hash, phash
from rsclip_jax.data.readers.captions import detect_delimiter, parse_separator
from rsclip_jax.preprocess import to_rgb

WORK_DIR = ".build"
SCAN_CACHE = "scan.jsonl"
SKIP_NOT_FOUND = "file not found"
SKIP_EMPTY_CAPTION = "empty caption"
# Every skip reason starts with one of these; the manifest's "skip_reasons" counts them.
REASON_KINDS = (SKIP_NOT_FOUND, SKIP_EMPTY_CAPTION, "cannot decode", "decompression bomb", "duplicate of",
                "test-split leakage")
# Removals the user asked for; they do not count towards --max-skipped-fraction.
FILTER_REASON_PREFIXES = ("duplicate of ", "test-split leakage: ")
_SHARD_FILE_RE = re.compile(r"^shard-\d{5}-of-\d{5}\.array_record(\.tmp)?$")
_SCAN_VERSION = 1  # bump when scan results change meaning (e.g. the hash), to invalidate caches
_HASH_DRAFT_SIZE = 64  # JPEGs are hashed from a DCT-scaled decode at least this big (pHash uses 32x32)


class BuildError(ValueError):
    """The build cannot run as asked (unreadable CSV, bad options); nothing about one image."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Options of `rsclip data build` (see `rsclip data build --help`)."""

    csvs: tuple[str, ...]
    out_dir: str
    sources: tuple[str, ...] = ()  # one name per CSV; default: each CSV's file stem
    # Where relative CSV paths point: one folder for all CSVs or one per CSV; default: each CSV's
    # folder. `rsclip data caption` writes paths relative to its --images, which goes here.
    images_roots: tuple[str, ...] = ()
    dedup: bool = False
    dedup_scope: str = "across"  # "across": only across sources (the rule); "all": also within one
    phash_threshold: int = 4
    exclude: tuple[str, ...] = ()
    exclude_images: tuple[str, ...] = ()  # none: each JSON's folder; one: for all; else one per --exclude
    exclude_splits: tuple[str, ...] = ("test",)
    workers: int = 1
    records_per_shard: int = 1024
    max_skipped_fraction: float = 0.5
    image_size: int | None = None  # re-encode images whose shorter side exceeds this
    reencode_format: str = "JPEG"
    jpeg_quality: int = 95
    max_pixels: int = Image.MAX_IMAGE_PIXELS  # read here, never changed globally
    csv_separator: str | None = None  # None: comma or tab, found from each CSV's header; also "tab", "\\t"
    image_column: str = "filepath"
    caption_column: str = "title"
    allow_empty: bool = False  # finish (an empty shard) when no image is left to write, instead of an error


@dataclasses.dataclass(frozen=True)
class InputImage:
    """One image to build: its resolved path, captions and provenance."""

    path: str
    captions: tuple[str, ...]
    source: str
    original_id: str
    position: int = 0  # index among all inputs of the build: the manifest lists skips in this order


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What a finished build wrote (the manifest) and whether its skipped share is acceptable."""

    manifest: dict
    manifest_path: str
    failed_fraction: float  # unusable inputs (not counting requested dedup/leakage removals)
    ok: bool  # failed_fraction <= max_skipped_fraction


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


def read_csv_inputs(csv_path: str, source: str, config: BuildConfig,
                    images_root: str | None = None) -> tuple[list[InputImage], int]:
    """Groups a caption CSV's rows by image path; returns (images in first-seen order, row count).

    Relative paths are resolved in `images_root`, by default the CSV's own folder.
    """
    base = os.path.abspath(images_root) if images_root else os.path.dirname(os.path.abspath(csv_path))
    captions: dict[str, list[str]] = {}
    rows = 0
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            delimiter = config.csv_separator
            if delimiter is None:
                header = f.readline().rstrip("\r\n")
                f.seek(0)
                try:
                    delimiter = detect_delimiter(header, config.image_column, config.caption_column, csv_path)
                except ValueError:  # the missing column is named below
                    delimiter = "\t" if "\t" in header else ","
                hint = "name the columns with --csv-img-key/--csv-caption-key"
            else:
                hint = f"split at --csv-separator {delimiter!r}; leave that flag out to detect comma or tab"
            reader = csv.DictReader(f, delimiter=delimiter)
            missing = {config.image_column, config.caption_column} - set(reader.fieldnames or ())
            if missing:
                raise BuildError(f"{csv_path}: no column {', '.join(sorted(missing))} in header {reader.fieldnames} "
                                 f"({hint})")
            for row in reader:
                rows += 1
                image = (row[config.image_column] or "").strip()
                caption = " ".join((row[config.caption_column] or "").split())
                captions.setdefault(image, [])
                if caption:
                    captions[image].append(caption)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BuildError(f"cannot read CSV {csv_path}: {e}") from None
    images = [InputImage(os.path.normpath(os.path.join(base, p)), tuple(c), source, p) for p, c in captions.items()]
    return images, rows


def read_exclusion_images(config: BuildConfig) -> list[tuple[str, str]]:
    """(path, label) of every image in the excluded splits of the `--exclude` Karpathy JSONs."""
    dirs = list(config.exclude_images)
    if len(dirs) not in (0, 1, len(config.exclude)):
        raise BuildError(f"give one --exclude-images for all --exclude files or one per file, not {len(dirs)}")
    out = []
    for i, json_path in enumerate(config.exclude):
        try:
            with open(json_path, encoding="utf-8") as f:
                entries = json.load(f)["images"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BuildError(f"cannot read Karpathy JSON {json_path}: {e!r}") from None
        root = dirs[i] if len(dirs) > 1 else dirs[0] if dirs else os.path.dirname(os.path.abspath(json_path))
        name = os.path.basename(json_path)
        for entry in entries:
            if entry.get("split") in config.exclude_splits:
                rel = os.path.join(entry.get("filepath", ""), entry["filename"])
                out.append((os.path.normpath(os.path.join(root, rel)), f"{name}:{entry['filename']}"))
    return out


def _parallel_map(fn: Callable, items: Sequence, workers: int, ordered: bool = True) -> Iterator:
    """map() over worker processes; in-process when workers <= 1 (no pickling, easy to debug)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    # forkserver: forking a parent that has started threads (jax, grain) is unsafe. Preloading
    # this module in the server makes each worker start in milliseconds instead of re-importing.
    # An executor (unlike multiprocessing.Pool) fails loudly if a worker dies.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(items)), mp_context=ctx) as pool:
        if ordered:
            yield from pool.map(fn, items, chunksize=max(1, min(64, len(items) // (workers * 8))))
        else:
            futures = [pool.submit(fn, item) for item in items]
            for future in concurrent.futures.as_completed(futures):
                yield future.result()


def _atomic_write_json(path: str, obj: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _scan_job(args: tuple[str, int]) -> dict:
    return scan_image(*args)


def scan_all(paths: Iterable[str], config: BuildConfig, log: Callable[[str], None]) -> dict[str, dict]:
    """Scan results for `paths`, reusing DIR/.build/scan.jsonl entries whose file is unchanged."""
    cache_path = os.path.join(config.out_dir, WORK_DIR, SCAN_CACHE)
    cached: dict[str, dict] = {}
    if os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    cached[entry["path"]] = entry
                except ValueError:  # a line cut short by an interruption
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
    with open(cache_path, "a", encoding="utf-8") as cache:
        for entry in _parallel_map(_scan_job, [(p, config.max_pixels) for p in todo], config.workers):
            results[entry["path"]] = entry
            if entry.get("reason") != SKIP_NOT_FOUND:
                cache.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return results


def _write_shard_job(args: tuple[str, dict, str]) -> dict:
    """Writes one planned shard and its done-marker; returns the marker."""
    out_dir, task, digest = args
    skipped: list[dict] = []
    sources: dict[str, int] = {}

    def records() -> Iterator[bytes]:
        for entry in task["entries"]:
            try:
                data, w, h, fmt = shards.encode_image(entry, task["encode"])
            except FileNotFoundError:  # deleted since the scan
                reason = SKIP_NOT_FOUND
            except Exception as e:  # noqa: BLE001 - one bad image must never stop the build
                reason = f"cannot decode: {type(e).__name__}: {e}"
            else:
                sources[entry["source"]] = sources.get(entry["source"], 0) + 1
                yield shards.encode_record(shards.ImageRecord(
                    data, tuple(entry["captions"]), entry["source"], entry["id"], w, h, fmt, entry["phash"]))
                continue
            skipped.append({"path": entry["path"], "source": entry["source"], "reason": reason,
                            "position": entry["position"]})

    path = os.path.join(out_dir, task["file"])
    count = shards.write_shard(path + ".tmp", records())
    os.replace(path + ".tmp", path)
    marker = {"file": task["file"], "digest": digest, "records": count, "sources": sources, "skipped": skipped}
    _atomic_write_json(os.path.join(out_dir, WORK_DIR, task["file"] + ".done.json"), marker)
    return marker


def plan_shards(kept: list[tuple[InputImage, dict]], config: BuildConfig) -> list[tuple[dict, str]]:
    """Deterministic (task, digest) per shard: images in input order, `records_per_shard` each."""
    encode = {"image_size": config.image_size, "format": config.reencode_format,
              "quality": config.jpeg_quality, "max_pixels": config.max_pixels}
    n = config.records_per_shard
    count = max(1, -(-len(kept) // n))
    plan = []
    for k in range(count):
        entries = [
            {"path": img.path, "captions": list(img.captions), "source": img.source, "id": img.original_id,
             "position": img.position,
             "format": scan["format"], "mode": scan["mode"], "width": scan["width"], "height": scan["height"],
             "phash": scan["phash"], "size": scan["size"], "mtime_ns": scan["mtime_ns"]}
            for img, scan in kept[k * n : (k + 1) * n]
        ]
        task = {"file": shards.shard_name(k, count), "entries": entries, "encode": encode,
                "record_format": shards.FORMAT_VERSION}
        digest = hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()
        plan.append((task, digest))
    return plan


def _filter_near_duplicates(
    candidates: list[tuple[InputImage, dict]], tests: list[tuple[str, str]], scans: dict[str, dict],
    config: BuildConfig,
) -> tuple[list[tuple[InputImage, dict]], list[tuple[InputImage, str]], dict]:
    """Applies --exclude (against the scanned `tests` images) then --dedup.

    Returns (kept, skipped with reasons, manifest sections).
    """
    kept, skipped = [], []
    info: dict = {}
    leak_index = None
    if config.exclude:
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
        info["exclude"] = {"jsons": list(config.exclude), "splits": list(config.exclude_splits),
                           "test_images": len(tests), "test_images_unreadable": missing, "removed": 0}
    dedup_index = PHashIndex(config.phash_threshold) if config.dedup else None
    if config.dedup:
        info["dedup"] = {"scope": config.dedup_scope, "removed": 0}
    for img, scan in candidates:
        value = hex_to_hash(scan["phash"])
        leak = leak_index.matches(value) if leak_index is not None else []
        if leak:
            label, d = min(leak, key=lambda m: m[1])
            skipped.append((img, f"test-split leakage: near-duplicate of {label} (phash distance {d})"))
            info["exclude"]["removed"] += 1
            continue
        if dedup_index is not None:
            dups = [(o, d) for o, d in dedup_index.matches(value)
                    if config.dedup_scope == "all" or o.source != img.source]
            if dups:
                other, d = dups[0]
                skipped.append((img, f"duplicate of {other.source}:{other.original_id} (phash distance {d})"))
                info["dedup"]["removed"] += 1
                continue
            dedup_index.add(value, img)
        kept.append((img, scan))
    if config.dedup or config.exclude:
        info["phash_threshold"] = config.phash_threshold
    return kept, skipped, info


def build(config: BuildConfig, log: Callable[[str], None] = lambda msg: None) -> BuildReport:
    """Runs (or resumes) a build; see the module docstring. Raises BuildError for unusable options."""
    if not config.csvs:
        raise BuildError("give at least one --csv")
    if config.sources and len(config.sources) != len(config.csvs):
        raise BuildError(f"give one --source per --csv ({len(config.csvs)}), not {len(config.sources)}")
    if len(config.images_roots) not in (0, 1, len(config.csvs)):
        raise BuildError(f"give --images-root once for all CSVs or once per --csv ({len(config.csvs)}), "
                         f"not {len(config.images_roots)} times")
    if config.dedup_scope not in ("across", "all"):
        raise BuildError(f"dedup scope must be 'across' or 'all', not {config.dedup_scope!r}")
    if config.records_per_shard < 1:
        raise BuildError("--records-per-shard must be >= 1")
    if config.reencode_format not in ("JPEG", "PNG"):
        raise BuildError(f"re-encode format must be JPEG or PNG, not {config.reencode_format!r}")
    if config.csv_separator is not None:
        try:
            config = dataclasses.replace(config, csv_separator=parse_separator(config.csv_separator))
        except ValueError as e:
            raise BuildError(str(e)) from None
    if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
        raise BuildError(f"--out {config.out_dir}: exists and is not a folder")
    manifest_path = os.path.join(config.out_dir, shards.MANIFEST_NAME)

    inputs: list[InputImage] = []
    csv_info = []
    for i, csv_path in enumerate(config.csvs):
        source = config.sources[i] if config.sources else os.path.splitext(os.path.basename(csv_path))[0]
        roots = config.images_roots
        root = roots[i] if len(roots) > 1 else roots[0] if roots else None
        images, rows = read_csv_inputs(csv_path, source, config, root)
        inputs += [dataclasses.replace(img, position=len(inputs) + k) for k, img in enumerate(images)]
        csv_info.append({"path": csv_path, "source": source, "rows": rows, "images": len(images), "images_root": root})
    if not inputs:
        raise BuildError("the CSVs list no images")
    log(f"{len(inputs)} images from {len(config.csvs)} CSV(s)")

    skipped: list[tuple[InputImage, str]] = [(img, SKIP_EMPTY_CAPTION) for img in inputs if not img.captions]
    with_captions = [img for img in inputs if img.captions]
    tests = read_exclusion_images(config) if config.exclude else []
    work = os.path.join(config.out_dir, WORK_DIR)
    made = _first_missing(work)
    os.makedirs(work, exist_ok=True)  # for the scan cache
    try:
        scans = scan_all([img.path for img in with_captions] + [path for path, _ in tests], config, log)
        candidates = []
        for img in with_captions:
            scan = scans[img.path]
            if "reason" in scan:
                skipped.append((img, scan["reason"]))
            else:
                candidates.append((img, scan))
        kept, removed, filter_info = _filter_near_duplicates(candidates, tests, scans, config)
        skipped += removed
        if not kept and not config.allow_empty:
            raise BuildError(_nothing_to_write(len(inputs), skipped))
    except BuildError:  # nothing was written but the scan cache: leave no folder this run made
        if made:
            shutil.rmtree(made, ignore_errors=True)
        raise

    # From here on the folder changes: a manifest marks a finished build, and this one is not yet.
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    plan = plan_shards(kept, config)
    planned_files = {task["file"] for task, _ in plan}
    for name in os.listdir(config.out_dir):  # shards of an earlier, different plan
        if _SHARD_FILE_RE.match(name) and name.removesuffix(".tmp") not in planned_files:
            os.remove(os.path.join(config.out_dir, name))
            if os.path.exists(os.path.join(work, name + ".done.json")):
                os.remove(os.path.join(work, name + ".done.json"))
    markers: dict[str, dict] = {}
    pending = []
    for task, digest in plan:
        marker_path = os.path.join(work, task["file"] + ".done.json")
        try:
            with open(marker_path, encoding="utf-8") as f:
                marker = json.load(f)
        except (OSError, ValueError):
            marker = None
        if marker and marker["digest"] == digest and os.path.exists(os.path.join(config.out_dir, task["file"])):
            markers[task["file"]] = marker
        else:
            pending.append((config.out_dir, task, digest))
    log(f"{len(kept)} images in {len(plan)} shards: {len(plan) - len(pending)} already done, writing {len(pending)}")
    for marker in _parallel_map(_write_shard_job, pending, config.workers, ordered=False):
        markers[marker["file"]] = marker
        log(f"  wrote {marker['file']} ({marker['records']} records)")

    manifest = _manifest(config, csv_info, inputs, skipped, plan, markers, filter_info)
    _atomic_write_json(manifest_path, manifest)
    failed = sum(1 for s in manifest["skipped"] if not s["reason"].startswith(FILTER_REASON_PREFIXES))
    fraction = failed / len(inputs)
    return BuildReport(manifest, manifest_path, fraction, fraction <= config.max_skipped_fraction)


def _first_missing(path: str) -> str | None:
    """The outermost folder of `path` that does not exist yet (what makedirs would create), or None."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path):
        path, top = os.path.dirname(path), path
    return top


def _nothing_to_write(inputs: int, skipped: list[tuple[InputImage, str]]) -> str:
    """The error of a build that would write no image: how many inputs each rule removed."""
    counts: dict[str, int] = {}
    for _, reason in skipped:
        kind = next((k for k in REASON_KINDS if reason.startswith(k)), reason)
        counts[kind] = counts.get(kind, 0) + 1
    flag = {"test-split leakage": " (--exclude)", "duplicate of": " (--dedup)"}
    why = ", ".join(f"{n} {kind}{flag.get(kind, '')}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"no image left to write: all {inputs} input image(s) were removed or skipped: {why}. "
            "Nothing was written; pass --allow-empty to finish with an empty build anyway")


def _manifest(config: BuildConfig, csv_info: list, inputs: list[InputImage], skipped: list, plan: list,
              markers: dict, filter_info: dict) -> dict:
    skipped_entries = [{"path": img.path, "source": img.source, "reason": reason, "position": img.position}
                       for img, reason in skipped]
    for task, _ in plan:
        skipped_entries += markers[task["file"]]["skipped"]
    skipped_entries.sort(key=lambda e: e["position"])
    skipped_entries = [{k: v for k, v in e.items() if k != "position"} for e in skipped_entries]
    sources = {c["source"]: {"inputs": 0, "written": 0, "skipped": 0} for c in csv_info}
    for img in inputs:
        sources[img.source]["inputs"] += 1
    for entry in skipped_entries:
        sources[entry["source"]]["skipped"] += 1
    for marker in markers.values():
        for source, n in marker["sources"].items():
            sources[source]["written"] += n
    written = sum(m["records"] for m in markers.values())
    if written + len(skipped_entries) != len(inputs):  # the invariant the whole design exists for
        raise AssertionError(f"internal error: {written} written + {len(skipped_entries)} skipped != {len(inputs)}")
    reasons: dict[str, int] = {}
    for entry in skipped_entries:
        kind = next((k for k in REASON_KINDS if entry["reason"].startswith(k)), entry["reason"])
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "format": "rsclip-arrayrecord-shards",
        "record_format_version": shards.FORMAT_VERSION,
        "inputs": len(inputs),
        "written": written,
        "skipped_count": len(skipped_entries),
        "sources": sources,
        "csvs": csv_info,
        "shards": [{"file": task["file"], "records": markers[task["file"]]["records"]} for task, _ in plan],
        "options": {"records_per_shard": config.records_per_shard, "image_size": config.image_size,
                    "reencode_format": config.reencode_format, "jpeg_quality": config.jpeg_quality,
                    "max_pixels": config.max_pixels, "dedup": config.dedup},
        **filter_info,
        "skip_reasons": reasons,
        "skipped": skipped_entries,
    }
