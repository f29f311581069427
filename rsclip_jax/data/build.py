"""`rsclip data build`: caption CSVs -> ArrayRecord shards + manifest.json.

Stages, each accounting for every input (written + skipped == inputs, always):
1. `build_inputs`: read the CSVs and group rows by filepath, one input image per (source,
   filepath); an image without a caption is skipped ("empty caption").
2. `build_scan`: scan every image (full decode, pHash), cached in DIR/.build/scan*.jsonl.
3. `build_scan`: `--exclude` drops test-split near-duplicates, `--dedup` later near-duplicates.
4. `build_write`: plan shards in input order and write them resumably (done-markers).
5. `build_manifest`: account for every input and write DIR/manifest.json.

Split across hosts (`task_count` > 1): each task does stages 1-4 for its contiguous share of the
inputs (`rsclip_jax.data.tasks.task_share`) and leaves its accounting in DIR/.build/<task>.json
instead of a manifest; `build_merge.merge` then checks every task's part and writes the one
manifest. Cross-task `--dedup` needs every task's images, so tasks only exclude and the merge
deduplicates (rewriting just the shards that lose records).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable

from rsclip_jax.data import shards
from rsclip_jax.data.build_inputs import (
    FILTER_REASON_PREFIXES,
    SKIP_EMPTY_CAPTION,
    BuildConfig,
    BuildError,
    InputImage,
    check_config,
    inputs_digest,
    output_options,
    read_exclusion_images,
    read_inputs,
)
from rsclip_jax.data.build_manifest import make_part, manifest_from_parts, nothing_to_write, part_path
from rsclip_jax.data.build_scan import WORK_DIR, exclude_leakage, find_duplicates, scan_all, scan_image
from rsclip_jax.data.build_write import (
    finished_markers,
    plan_shards,
    remove_stale_shards,
    write_pending,
    write_shard_job,
)
from rsclip_jax.data.tasks import task_label, task_share
from rsclip_jax.fileio import atomic_write_json

__all__ = ["BuildConfig", "BuildError", "BuildReport", "InputImage", "build", "build_head", "report_for",
           "scan_image"]

# Looked up here at call time, so a test can wrap it (workers=1 runs it in-process).
_write_shard_job = write_shard_job


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What a finished build wrote (the manifest, or one task's part) and whether its skipped share
    is acceptable."""

    manifest: dict
    manifest_path: str
    failed_fraction: float  # unusable inputs (not counting requested dedup/leakage removals)
    ok: bool  # failed_fraction <= max_skipped_fraction


def report_for(manifest: dict, path: str, inputs: int, config: BuildConfig) -> BuildReport:
    """The report of a manifest (or part) covering `inputs` inputs."""
    failed = sum(1 for s in manifest["skipped"] if not s["reason"].startswith(FILTER_REASON_PREFIXES))
    fraction = failed / inputs if inputs else 0.0
    return BuildReport(manifest, path, fraction, fraction <= config.max_skipped_fraction)


def build_head(config: BuildConfig, inputs: list[InputImage], csv_info: list[dict]) -> dict:
    """What every part of one build shares (and its merge checks): options, the input list, CSVs."""
    return {"task": {"index": config.task_index, "count": config.task_count}, "options": output_options(config),
            "inputs_digest": inputs_digest(inputs), "inputs": len(inputs), "csvs": csv_info}


def _first_missing(path: str) -> str | None:
    """The outermost folder of `path` that does not exist yet (what makedirs would create), or None."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path):
        path, top = os.path.dirname(path), path
    return top


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def build(config: BuildConfig, log: Callable[[str], None] = lambda msg: None) -> BuildReport:
    """Runs (or resumes) a build, or one task's share of it; see the module docstring.

    Raises BuildError for unusable options.
    """
    config = check_config(config)
    split = config.task_count > 1
    label = task_label(config.task_index, config.task_count) if split else ""
    manifest_path = os.path.join(config.out_dir, shards.MANIFEST_NAME)

    inputs, csv_info = read_inputs(config)
    positions = task_share(len(inputs), config.task_index, config.task_count)
    share = inputs[positions.start : positions.stop]
    log(f"{len(inputs)} images from {len(config.csvs)} CSV(s)" +
        (f"; task {config.task_index} of {config.task_count}: images {positions.start}..{positions.stop - 1}"
         if split else ""))

    skipped: list[tuple[InputImage, str]] = [(img, SKIP_EMPTY_CAPTION) for img in share if not img.captions]
    with_captions = [img for img in share if img.captions]
    tests = read_exclusion_images(config) if config.exclude else []
    work = os.path.join(config.out_dir, WORK_DIR)
    made = _first_missing(work)
    os.makedirs(work, exist_ok=True)  # for the scan cache
    try:
        scans = scan_all([img.path for img in with_captions] + [path for path, _ in tests], config, log, label)
        candidates = []
        for img in with_captions:
            scan = scans[img.path]
            if "reason" in scan:
                skipped.append((img, scan["reason"]))
            else:
                candidates.append((img, scan))
        kept, removed, filter_info = exclude_leakage(candidates, tests, scans, config)
        skipped += removed
        if config.dedup and not split:  # a split build's tasks leave --dedup to the merge, which sees every task
            dups = find_duplicates([(img.source, img.original_id, scan["phash"]) for img, scan in kept],
                                   config.phash_threshold, config.dedup_scope)
            skipped += [(kept[k][0], reason) for k, reason in dups.items()]
            kept = [item for k, item in enumerate(kept) if k not in dups]
            filter_info["dedup"] = {"scope": config.dedup_scope, "removed": len(dups)}
        if not kept and not config.allow_empty and not split:  # a task's share may be empty; the merge decides
            raise BuildError(nothing_to_write(len(inputs), [{"reason": reason} for _, reason in skipped]))
    except BuildError:  # nothing was written but the scan cache: leave no folder this run made
        if made and not split:  # other tasks may be writing into a folder this task made
            shutil.rmtree(made, ignore_errors=True)
        raise

    plan = plan_shards(kept, config, label, at_least_one=not split)
    markers, pending = finished_markers(config.out_dir, plan)
    # From here on the folder changes: a manifest marks a finished build, and this one is not yet.
    if pending or not split:
        _remove(manifest_path)
    remove_stale_shards(config.out_dir, label, plan)
    log(f"{len(kept)} images in {len(plan)} shards: {len(plan) - len(pending)} already done, writing {len(pending)}")
    write_pending(pending, markers, config.workers, _write_shard_job, log)

    part = make_part(config, share, skipped, plan, markers, filter_info, build_head(config, inputs, csv_info))
    if not split:
        manifest = manifest_from_parts([part], config)
        atomic_write_json(manifest_path, manifest, indent=1, ensure_ascii=False)
        return report_for(manifest, manifest_path, len(inputs), config)
    if config.dedup:  # what the merge deduplicates: every image exclusion kept, in input order
        part["candidates"] = [[img.position, img.path, img.source, img.original_id, scan["phash"]]
                              for img, scan in kept]
    path = part_path(config.out_dir, label)
    try:
        with open(path, encoding="utf-8") as f:
            unchanged = json.load(f) == part
    except (OSError, ValueError):
        unchanged = False
    if not unchanged:  # a rerun that changed nothing writes nothing
        _remove(manifest_path)
        atomic_write_json(path, part, indent=1, ensure_ascii=False)
    return report_for(part, path, len(share), config)
