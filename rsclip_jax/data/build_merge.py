"""`rsclip data build --merge`: one manifest from the parts of a build split into tasks.

Every task of `--task-count N` leaves DIR/.build/task-I-of-N.json (its shards with the input
positions of their records, and its skips). The merge reads the same CSVs, checks that every
task finished with the same options and the same input list, and writes DIR/manifest.json, with
every input written or skipped exactly once (`manifest_from_parts` asserts it).

`--dedup` needs every task's images: the tasks write every image that `--exclude` kept, and the
merge finds near-duplicates over all of them in input order, exactly as one build would. A shard
that loses records is copied without them to NAME.dedup.array_record (the task's own file stays,
so tasks and the merge can both be rerun); shards without duplicates are used as they are.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable

from rsclip_jax.data import shards
from rsclip_jax.data.build import BuildReport, build_head, report_for
from rsclip_jax.data.build_inputs import BuildConfig, BuildError, check_config, read_inputs
from rsclip_jax.data.build_manifest import manifest_from_parts, nothing_to_write, part_path
from rsclip_jax.data.build_scan import find_duplicates, parallel_map
from rsclip_jax.data.build_write import finished_markers, marker_path
from rsclip_jax.data.tasks import task_label
from rsclip_jax.fileio import atomic_write, atomic_write_json

DEDUP_SUFFIX = ".dedup" + shards.SHARD_SUFFIX


def _differences(part: dict, head: dict) -> str:
    """What differs between a task's part and this merge's options and inputs ('' when nothing)."""
    diffs = [f"{key} {part['options'].get(key)!r} (this merge: {value!r})"
             for key, value in head["options"].items() if part["options"].get(key) != value]
    if part["inputs_digest"] != head["inputs_digest"] or part["csvs"] != head["csvs"]:
        diffs.append(f"its CSVs listed {part['inputs']} images, this merge's {head['inputs']} (another input list, "
                     "or the CSVs changed since)")
    return ", ".join(diffs)


def load_parts(config: BuildConfig, head: dict) -> list[dict]:
    """The part of every task, in task order; BuildError naming missing or mismatched tasks."""
    n = config.task_count
    parts, missing, mismatched = [], [], []
    for i in range(n):
        path = part_path(config.out_dir, task_label(i, n))
        try:
            with open(path, encoding="utf-8") as f:
                part = json.load(f)
        except FileNotFoundError:
            missing.append(i)
            continue
        except (OSError, ValueError) as e:
            raise BuildError(f"--merge: cannot read task {i}'s part {path}: {e}; rerun task {i}") from None
        diff = _differences(part, head)
        if part.get("task") != {"index": i, "count": n}:
            diff = f"the file names task {part.get('task')}" + (f", {diff}" if diff else "")
        if diff:
            mismatched.append(f"task {i}: {diff}")
        parts.append(part)
    if missing:
        raise BuildError(f"--merge: task(s) {', '.join(map(str, missing))} of {n} have not finished (no "
                         f"{part_path(config.out_dir, task_label(missing[0], n))}); run `rsclip data build` with the "
                         f"same options and --task-index I --task-count {n} for each, then merge again")
    if mismatched:
        raise BuildError(f"--merge: task(s) built with other options or inputs than this merge: {'; '.join(mismatched)}"
                         "; rerun those tasks with this merge's options")
    for i, part in enumerate(parts):
        gone = [s["file"] for s in part["shards"] if not os.path.exists(os.path.join(config.out_dir, s["file"]))]
        if gone:
            raise BuildError(f"--merge: task {i}'s shard {gone[0]} is missing from {config.out_dir} "
                             f"({len(gone)} in all); rerun task {i}")
    return parts


def rewrite_shard_job(args: tuple[str, str, str, list[int], str]) -> dict:
    """Copies shard `src` without the records at `drop` to `dst`, then marks it done."""
    out_dir, src, dst, drop, digest = args
    dropped = set(drop)
    records = (r for k, r in enumerate(shards.read_shard(os.path.join(out_dir, src))) if k not in dropped)
    counts = []
    atomic_write(os.path.join(out_dir, dst), lambda tmp: counts.append(shards.write_shard(tmp, records)))
    marker = {"file": dst, "digest": digest, "records": counts[0], "from": src, "dropped": drop}
    atomic_write_json(marker_path(out_dir, dst), marker, indent=1)
    return marker


def dedup_across_tasks(parts: list[dict], config: BuildConfig, log: Callable[[str], None]) -> list[dict]:
    """The parts as one `--dedup` build would have written them (copies; shards rewritten as needed)."""
    candidates = sorted((c for p in parts for c in p["candidates"]), key=lambda c: c[0])
    found = find_duplicates([(source, original_id, phash) for _, _, source, original_id, phash in candidates],
                            config.phash_threshold, config.dedup_scope)
    removed = {candidates[k][0]: (candidates[k], reason) for k, reason in found.items()}
    parts = copy.deepcopy(parts)
    plan: list[tuple[dict, str]] = []  # (shard entry to update, digest of its rewrite)
    for part in parts:
        part["dedup"] = {"scope": config.dedup_scope, "removed": 0}
        for entry in part["skipped"]:  # one build dedups before writing: a duplicate never fails to write
            if entry["position"] in removed:
                entry["reason"] = removed[entry["position"]][1]
                part["dedup"]["removed"] += 1
        for shard in part["shards"]:
            drop = [k for k, position in enumerate(shard["positions"]) if position in removed]
            if not drop:
                continue
            for k in drop:
                (position, path, source, _, _), reason = removed[shard["positions"][k]]
                part["skipped"].append({"path": path, "source": source, "reason": reason, "position": position})
                part["sources"][source]["written"] -= 1
                part["sources"][source]["skipped"] += 1
                part["dedup"]["removed"] += 1
            with open(marker_path(config.out_dir, shard["file"]), encoding="utf-8") as f:
                source_digest = json.load(f)["digest"]
            task = {"file": shard["file"].removesuffix(shards.SHARD_SUFFIX) + DEDUP_SUFFIX, "src": shard["file"],
                    "drop": drop}
            plan.append((task, hashlib.sha256(f"{source_digest}:{drop}".encode()).hexdigest()))
            dropped = set(drop)
            shard.update(file=task["file"], records=shard["records"] - len(drop),
                         positions=[p for k, p in enumerate(shard["positions"]) if k not in dropped])
        part["skipped"].sort(key=lambda e: e["position"])
    markers, pending = finished_markers(config.out_dir, plan)
    log(f"--dedup: {len(removed)} near-duplicate(s) across all tasks; {len(plan)} shard(s) lose records: "
        f"{len(plan) - len(pending)} already rewritten, rewriting {len(pending)}")
    jobs = [(out_dir, task["src"], task["file"], task["drop"], digest) for out_dir, task, digest in pending]
    for marker in parallel_map(rewrite_shard_job, jobs, config.workers, ordered=False):
        log(f"  wrote {marker['file']} ({marker['records']} records)")
    planned = {task["file"] for task, _ in plan}
    for name in os.listdir(config.out_dir):  # rewrites of an earlier merge that this one does not use
        if name.endswith(DEDUP_SUFFIX) and name not in planned:
            os.remove(os.path.join(config.out_dir, name))
    return parts


def merge(config: BuildConfig, log: Callable[[str], None] = lambda msg: None) -> BuildReport:
    """Writes DIR/manifest.json from the parts of all `config.task_count` tasks; see the module docstring.

    Raises BuildError naming missing or mismatched tasks, or when no image was written at all
    (unless `config.allow_empty`).
    """
    if config.task_count < 2:
        raise BuildError("--merge needs --task-count N (2 or more): the number of tasks the build was split into")
    config = check_config(config)
    inputs, csv_info = read_inputs(config)
    parts = load_parts(config, build_head(config, inputs, csv_info))
    log(f"merging {len(parts)} tasks: {sum(p['written'] for p in parts)} images in "
        f"{sum(len(p['shards']) for p in parts)} shards")
    if config.dedup:
        parts = dedup_across_tasks(parts, config, log)
    manifest = manifest_from_parts(parts, config)
    if not manifest["written"] and not config.allow_empty:
        raise BuildError(nothing_to_write(len(inputs), manifest["skipped"]))
    path = os.path.join(config.out_dir, shards.MANIFEST_NAME)
    atomic_write_json(path, manifest, indent=1, ensure_ascii=False)
    return report_for(manifest, path, len(inputs), config)
