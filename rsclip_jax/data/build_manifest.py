"""`rsclip data build`, stage 5: account for every input and write the manifest.

A task (the whole build, or one share of a split build) sums up what it did as a *part*: its
shards with the input positions of their records, and its skipped inputs with reasons and
positions. `manifest_from_parts` combines the parts of all tasks into DIR/manifest.json and checks
that every input position is written or skipped exactly once. One task's part is combined in
memory; a split build's parts are DIR/.build/task-I-of-N.json, combined by `--merge`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from rsclip_jax.data import shards
from rsclip_jax.data.build_inputs import BuildConfig, InputImage, reason_kind
from rsclip_jax.data.build_scan import WORK_DIR
from rsclip_jax.tokenizer import max_token_count

PART_FORMAT = "rsclip-build-part"


def part_path(out_dir: str, label: str) -> str:
    """Where a task of a split build leaves its part, e.g. DIR/.build/task-00001-of-00003.json."""
    return os.path.join(out_dir, WORK_DIR, f"{label}.json")


def make_part(config: BuildConfig, share: Sequence[InputImage], skipped: list[tuple[InputImage, str]], plan: list,
              markers: dict, filter_info: dict, head: dict) -> dict:
    """This task's accounting: `head` (task, options, digests, CSVs), then shards, skips, counts.

    Every input of `share` ends up in exactly one shard's "positions" or in "skipped".
    """
    skipped_entries = [{"path": img.path, "source": img.source, "reason": reason, "position": img.position}
                       for img, reason in skipped]
    part_shards = []
    for task, _ in plan:
        marker = markers[task["file"]]
        skipped_entries += marker["skipped"]
        failed = {s["position"] for s in marker["skipped"]}
        positions = [e["position"] for e in task["entries"] if e["position"] not in failed]
        if len(positions) != marker["records"]:
            raise AssertionError(f"internal error: {task['file']} holds {marker['records']} records, "
                                 f"its plan {len(positions)}")
        # what a multi-process run trims every caption batch to (docs/training.md, "Caption padding")
        longest = max_token_count(c for e in task["entries"] if e["position"] not in failed for c in e["captions"])
        part_shards.append({"file": task["file"], "records": marker["records"], "positions": positions,
                            "max_caption_tokens": longest})
    skipped_entries.sort(key=lambda e: e["position"])
    sources = {c["source"]: {"inputs": 0, "written": 0, "skipped": 0} for c in head["csvs"]}
    for img in share:
        sources[img.source]["inputs"] += 1
    for entry in skipped_entries:
        sources[entry["source"]]["skipped"] += 1
    for marker in markers.values():
        for source, n in marker["sources"].items():
            sources[source]["written"] += n
    part = {"format": PART_FORMAT, **head, "share_inputs": len(share),
            "written": sum(s["records"] for s in part_shards), "skipped_count": len(skipped_entries),
            "sources": sources, "shards": part_shards, **filter_info, "skip_reasons": count_reasons(skipped_entries),
            "skipped": skipped_entries}
    if config.dedup or config.exclude:
        part["phash_threshold"] = config.phash_threshold
    return part


def manifest_from_parts(parts: Sequence[dict], config: BuildConfig) -> dict:
    """The manifest of the parts of all tasks, in task order.

    Raises:
        AssertionError: unless every input position is written or skipped exactly once.
    """
    first = parts[0]
    total = first["inputs"]
    skipped = sorted((s for p in parts for s in p["skipped"]), key=lambda s: s["position"])
    positions = [s["position"] for s in skipped] + [i for p in parts for s in p["shards"] for i in s["positions"]]
    if sorted(positions) != list(range(total)):  # the invariant the whole design exists for
        seen: dict[int, int] = {}
        for i in positions:
            seen[i] = seen.get(i, 0) + 1
        twice = sorted(i for i, n in seen.items() if n > 1)[:5]
        lost = sorted(set(range(total)) - set(seen))[:5]
        raise AssertionError(f"internal error: {len(positions)} inputs accounted for, not {total} exactly once "
                             f"(twice: {twice}, never: {lost})")
    sources = {c["source"]: {"inputs": 0, "written": 0, "skipped": 0} for c in first["csvs"]}
    for part in parts:
        for source, counts in part["sources"].items():
            for key, n in counts.items():
                sources[source][key] += n
    written = sum(s["records"] for p in parts for s in p["shards"])
    manifest = {
        "format": "rsclip-arrayrecord-shards",
        "record_format_version": shards.FORMAT_VERSION,
        "inputs": total,
        "written": written,
        "skipped_count": len(skipped),
        "sources": sources,
        "csvs": first["csvs"],
        "shards": [{k: s[k] for k in ("file", "records", "max_caption_tokens") if k in s}
                   for p in parts for s in p["shards"]],
        "options": {"records_per_shard": config.records_per_shard, "image_size": config.image_size,
                    "reencode_format": config.reencode_format, "jpeg_quality": config.jpeg_quality,
                    "max_pixels": config.max_pixels, "dedup": config.dedup},
    }
    lengths = [s.get("max_caption_tokens") for s in manifest["shards"]]
    if lengths and None not in lengths:  # parts written before the field existed leave it out
        manifest["max_caption_tokens"] = max(lengths)
    if len(parts) > 1:
        manifest["tasks"] = len(parts)
    if "phash_threshold" in first:
        manifest["phash_threshold"] = first["phash_threshold"]
    for key in ("exclude", "dedup"):  # the same settings in every part; only the removals add up
        if key in first:
            manifest[key] = {**first[key], "removed": sum(p[key]["removed"] for p in parts)}
    manifest["skip_reasons"] = count_reasons(skipped)
    manifest["skipped"] = [{k: v for k, v in e.items() if k != "position"} for e in skipped]
    return manifest


def count_reasons(skipped: Sequence[dict]) -> dict[str, int]:
    """How many skips of each kind (`REASON_KINDS`): the manifest's "skip_reasons"."""
    counts: dict[str, int] = {}
    for entry in skipped:
        kind = reason_kind(entry["reason"])
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def nothing_to_write(inputs: int, skipped: Sequence[dict]) -> str:
    """The error of a build that would write no image: how many inputs each rule removed."""
    counts = count_reasons(skipped)
    flag = {"test-split leakage": " (--exclude)", "duplicate of": " (--dedup)"}
    why = ", ".join(f"{n} {kind}{flag.get(kind, '')}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"no image left to write: all {inputs} input image(s) were removed or skipped: {why}. "
            "Nothing was written; pass --allow-empty to finish with an empty build anyway")
