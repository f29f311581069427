"""`rsclip data build`, stage 4: plan the shards and write them, resumably.

The surviving images, in input order, go to shards of `records_per_shard`. Each shard is written
by one worker to a temporary file, renamed into place, and then marked done by an atomically
written DIR/.build/<shard>.done.json holding the digest of its task. A rerun recomputes the same
plan and skips every shard whose marker digest matches.

A task of a split build prefixes its shard names with its label (`task-00001-of-00003.shard-...`),
so tasks writing into one --out never collide, and each task only ever removes its own files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator

from rsclip_jax.data import shards
from rsclip_jax.data.build_inputs import SKIP_NOT_FOUND, BuildConfig, InputImage
from rsclip_jax.data.build_scan import WORK_DIR, parallel_map
from rsclip_jax.fileio import atomic_write, atomic_write_json


def shard_file(label: str, index: int, count: int) -> str:
    """A shard's file name: ``shard-00003-of-00010.array_record``, after ``LABEL.`` for a task's."""
    return f"{label}.{shards.shard_name(index, count)}" if label else shards.shard_name(index, count)


def _own_file_re(label: str) -> re.Pattern:
    """This task's shard files, final or temporary (fileio's hidden `.NAME.xxxxxxxx.tmp`, or an
    older build's `NAME.tmp`); group 1 is the final name."""
    prefix = re.escape(f"{label}.") if label else ""
    return re.compile(rf"^\.?({prefix}shard-\d{{5}}-of-\d{{5}}\{shards.SHARD_SUFFIX})(\.[0-9a-f]{{8}})?(\.tmp)?$")


def marker_path(out_dir: str, file: str) -> str:
    """Where the done-marker of shard `file` lives."""
    return os.path.join(out_dir, WORK_DIR, file + ".done.json")


def write_shard_job(args: tuple[str, dict, str]) -> dict:
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

    counts = []
    atomic_write(os.path.join(out_dir, task["file"]), lambda tmp: counts.append(shards.write_shard(tmp, records())))
    marker = {"file": task["file"], "digest": digest, "records": counts[0], "sources": sources, "skipped": skipped}
    atomic_write_json(marker_path(out_dir, task["file"]), marker, indent=1, ensure_ascii=False)
    return marker


def plan_shards(kept: list[tuple[InputImage, dict]], config: BuildConfig, label: str = "",
                at_least_one: bool = True) -> list[tuple[dict, str]]:
    """Deterministic (task, digest) per shard: images in input order, `records_per_shard` each.

    With `at_least_one`, no image still plans one (empty) shard; a task of a split build plans none.
    """
    encode = {"image_size": config.image_size, "format": config.reencode_format,
              "quality": config.jpeg_quality, "max_pixels": config.max_pixels}
    n = config.records_per_shard
    count = max(int(at_least_one), -(-len(kept) // n))
    plan = []
    for k in range(count):
        entries = [
            {"path": img.path, "captions": list(img.captions), "source": img.source, "id": img.original_id,
             "position": img.position,
             "format": scan["format"], "mode": scan["mode"], "width": scan["width"], "height": scan["height"],
             "phash": scan["phash"], "size": scan["size"], "mtime_ns": scan["mtime_ns"]}
            for img, scan in kept[k * n : (k + 1) * n]
        ]
        task = {"file": shard_file(label, k, count), "entries": entries, "encode": encode,
                "record_format": shards.FORMAT_VERSION}
        digest = hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()
        plan.append((task, digest))
    return plan


def remove_stale_shards(out_dir: str, label: str, plan: list[tuple[dict, str]]) -> None:
    """Deletes this task's shard files of an earlier, different plan, and interrupted temporaries."""
    planned = {task["file"] for task, _ in plan}
    own = _own_file_re(label)
    for name in os.listdir(out_dir):
        match = own.match(name)
        if not match:
            continue
        temporary = name != match.group(1)
        if temporary or match.group(1) not in planned:
            os.remove(os.path.join(out_dir, name))
        if not temporary and match.group(1) not in planned and os.path.exists(marker_path(out_dir, name)):
            os.remove(marker_path(out_dir, name))


def finished_markers(out_dir: str, plan: list[tuple[dict, str]]) -> tuple[dict[str, dict], list[tuple]]:
    """(markers of the planned shards already done, job arguments of those still to write)."""
    markers: dict[str, dict] = {}
    pending = []
    for task, digest in plan:
        try:
            with open(marker_path(out_dir, task["file"]), encoding="utf-8") as f:
                marker = json.load(f)
        except (OSError, ValueError):
            marker = None
        if marker and marker["digest"] == digest and os.path.exists(os.path.join(out_dir, task["file"])):
            markers[task["file"]] = marker
        else:
            pending.append((out_dir, task, digest))
    return markers, pending


def write_pending(pending: list[tuple], markers: dict[str, dict], workers: int, job: Callable[[tuple], dict],
                  log: Callable[[str], None]) -> None:
    """Runs `job` (normally `write_shard_job`) for every pending shard, adding its marker to `markers`."""
    for marker in parallel_map(job, pending, workers, ordered=False):
        markers[marker["file"]] = marker
        log(f"  wrote {marker['file']} ({marker['records']} records)")
