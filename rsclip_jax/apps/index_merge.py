"""`rsclip index merge`: one index from several built with the same model, e.g. by separate jobs that
each indexed their share of an archive (one region, one year, one machine each).

Shards are carried over as they are: their embeddings and IVF files are hard-linked when the
filesystem allows (copied otherwise), and only the small metadata Parquet is rewritten, with the ids
the shard gets in the merged index. The sources are not changed. The merged manifest is written
last, so an interrupted merge leaves no index.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rsclip_jax.apps.index_store import (
    MANIFEST,
    ROW_GROUP,
    index_lock,
    new_shard_name,
    now,
    read_manifest,
    write_manifest,
)
from rsclip_jax.fileio import atomic_write_folder

SAME_MODEL_KEYS = ("fingerprint", "embed_dim")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def merge_indexes(out: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Writes a new index at `out` holding every shard of `sources`, in order; returns its manifest.

    Raises:
        ValueError: for fewer than two sources, an existing `out`, or sources of different models
            (naming both).
        FileNotFoundError: for a source that is not an index.
    """
    out = Path(out).absolute()
    if len(sources) < 2:
        raise ValueError("give at least two indexes to merge")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: exists and is not empty; give a new folder for the merged index")
    manifests = [read_manifest(s) for s in sources]
    first = manifests[0]
    for src, m in zip(sources[1:], manifests[1:]):
        for key in SAME_MODEL_KEYS:
            if m.get(key) != first.get(key):
                raise ValueError(f"{src} was built with {m['model']} from {m['checkpoint']} ({key} "
                                 f"{str(m.get(key))[:12]}), {sources[0]} with {first['model']} from "
                                 f"{first['checkpoint']} ({key} {str(first.get(key))[:12]}): indexes of different "
                                 "models cannot be merged")
    merged = {k: v for k, v in first.items() if k not in ("shards", "count", "updated")}
    merged.update(created=now(), merged_from=[str(Path(s).absolute()) for s in sources], shards=[],
                  kind=first["kind"] if all(m["kind"] == first["kind"] for m in manifests) else "mixed")
    roots = [m.get("root") for m in manifests if m.get("root")]
    merged["root"] = os.path.commonpath(roots) if roots else None
    with index_lock(out):
        if (out / MANIFEST).exists():
            raise ValueError(f"--out {out}: already an index")
        next_id = 0
        for src, m in zip(sources, manifests):
            for shard in m["shards"]:
                name = new_shard_name(len(merged["shards"]))
                folder = Path(src) / shard["name"]

                def write(staging: Path, folder: Path = folder, offset: int = next_id - shard["first_id"]) -> None:
                    for f in folder.iterdir():
                        if f.name != "metadata.parquet":
                            _link_or_copy(f, staging / f.name)
                    table = pq.read_table(folder / "metadata.parquet")
                    ids = pc.add(table.column("id"), pa.scalar(offset, pa.int64()))
                    table = table.set_column(table.schema.get_field_index("id"), "id", ids)
                    pq.write_table(table, staging / "metadata.parquet", row_group_size=ROW_GROUP)

                atomic_write_folder(out / name, write)
                merged["shards"].append(dict(shard, name=name, first_id=next_id, row_group=ROW_GROUP,
                                             merged_from=str(folder)))
                next_id += shard["count"]
        write_manifest(out, merged)
    return read_manifest(out)
