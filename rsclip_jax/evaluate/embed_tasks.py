"""`rsclip embed` split across hosts: each task embeds its share into a part file; a merge joins them.

Every task lists the same images and texts (the same `--images`/`--texts`) and embeds the
contiguous share `rsclip_jax.data.tasks.task_share` gives it, into OUT's part file
(`emb.task-00001-of-00003.npz` for `--out emb.npz`), written atomically. The merge checks that
every task finished, over the same inputs with the same model, and writes OUT with exactly what
one run writes: the same arrays, in input order, every input kept or skipped exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from rsclip_jax.data.tasks import task_label, task_share
from rsclip_jax.fileio import atomic_write_npz

_META = "task_meta"  # a JSON string in the part: task, input digest, totals, model fingerprint


def part_path(out: str, index: int, count: int) -> str:
    """The part file of task `index` of `count` beside `out` (``emb.npz`` -> ``emb.task-...npz``)."""
    stem = out[:-4] if out.lower().endswith(".npz") else out
    return f"{stem}.{task_label(index, count)}.npz"


def inputs_digest(paths: Sequence[str], texts: Sequence[str], reading: object) -> str:
    """sha256 of the input lists and how images are read: tasks and their merge must agree on it."""
    blob = json.dumps({"images": list(paths), "texts": list(texts), "reading": reading}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def shares(n_images: int, n_texts: int, index: int, count: int) -> tuple[range, range]:
    """The image and text positions task `index` of `count` embeds."""
    return task_share(n_images, index, count), task_share(n_texts, index, count)


def write_part(out: str, index: int, count: int, digest: str, fingerprint: str, totals: tuple[int, int],
               arrays: dict[str, np.ndarray]) -> str:
    """Writes one task's arrays (with `image_positions`, `skipped_positions`, `text_positions`:
    the input positions of its rows) and its meta; returns the part's path."""
    meta = {"task": [index, count], "inputs_digest": digest, "images": totals[0], "texts": totals[1],
            "fingerprint": fingerprint}
    path = part_path(out, index, count)
    atomic_write_npz(path, {**arrays, _META: np.array(json.dumps(meta))})
    return path


def merge_parts(out: str, count: int, digest: str, totals: tuple[int, int]) -> dict[str, np.ndarray]:
    """The arrays one run would write, from the parts of all `count` tasks.

    Raises:
        ValueError: naming the tasks whose part is missing, or was made from other inputs or with
            another model than the others.
    """
    paths = [part_path(out, i, count) for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--merge: task(s) {', '.join(map(str, missing))} of {count} have not finished (no "
                         f"{paths[missing[0]]}); run them with --task-index I --task-count {count}, then merge again")
    parts, fingerprint = [], ""
    for i, p in enumerate(paths):
        with np.load(p) as z:
            parts.append({k: z[k] for k in z.files})
        meta = json.loads(str(parts[-1].pop(_META)))
        if meta["task"] != [i, count] or meta["inputs_digest"] != digest:
            raise ValueError(f"--merge: task {i} ({p}) embedded other inputs ({meta['images']} images, "
                             f"{meta['texts']} texts) than these ({totals[0]} images, {totals[1]} texts); rerun it "
                             "with the same --images/--texts/--bands/--scale/--gamma")
        fingerprint = fingerprint if i else meta["fingerprint"]
        if meta["fingerprint"] != fingerprint:
            raise ValueError(f"--merge: task {i} ({p}) used another model (fingerprint {meta['fingerprint'][:12]}) "
                             f"than task 0 ({fingerprint[:12]}); rerun it with task 0's --checkpoint")
    merged: dict[str, np.ndarray] = {}
    for key in parts[0]:
        merged[key] = np.concatenate([part[key] for part in parts])
    for kind, total, kept, dropped in (("image", totals[0], "image_positions", "skipped_positions"),
                                       ("text", totals[1], "text_positions", None)):
        if kept not in merged:
            continue
        rows = merged.pop(kept)
        positions = np.concatenate([rows, merged.pop(dropped)]) if dropped else rows
        # every input once, none lost or twice; kept rows in input order
        if not np.array_equal(np.sort(positions), np.arange(total)) or np.any(np.diff(rows) <= 0):
            raise AssertionError(f"internal error: the parts' {kind} positions are not 0..{total - 1} once, in order")
    return merged
