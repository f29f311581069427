"""Building a search index over an image archive: `rsclip index build` and `rsclip index add`.

Images and scene tiles (`index_inputs`) are embedded in chunks with the project's `Extractor`
(batches sharded over every device of every host; on several hosts each process embeds its share
of each batch and process 0 gathers and writes), then written as shards (`index_store`): every
build or add writes new shards and publishes them by rewriting the manifest last, so a crash
never leaves a half index visible, and ids already given never change.

`add_to_index` refuses nothing silently: files already indexed are skipped and counted (a file
that changed since is skipped with a warning: rebuild to refresh it), and it requires the model
the index was built with (same weights fingerprint).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from rsclip_jax.apps.index_inputs import (
    ArchiveReader,
    Item,
    Options,
    collect,
    file_identity,
    is_scene_input,
    iter_chunks,
    read_item,
    record_of,
    scene_items,
)
from rsclip_jax.apps.index_store import (
    FORMAT,
    MANIFEST,
    VERSION,
    IndexFormatError,
    Record,
    index_lock,
    indexed_files,
    new_shard_name,
    now,
    read_manifest,
    unlisted_shards,
    write_manifest,
    write_shard,
)
from rsclip_jax.apps.index_vectors import KINDS, resolve_kind
from rsclip_jax.checkpoint import load_checkpoint_with_info, load_tokenizer
from rsclip_jax.evaluate.embeddings import PREPROCESSING, Extractor
from rsclip_jax.preprocess import ImageReadError
from rsclip_jax.raster import RasterError

DEFAULT_SHARD_SIZE = 1_000_000  # rows per shard: 2 GB of 512-d embeddings
CHUNK_BYTES = 256 * 2**20  # scene pixels read ahead at most
# Text queries for the recall check of approximate shards (text sits apart from image embeddings).
CALIBRATION_PROMPTS = [f"a satellite image of {c}" for c in (
    "a forest", "farmland", "a river", "a lake", "the sea", "a beach", "a harbour with ships", "an airport",
    "a highway", "a railway", "a dense residential area", "a sparse residential area", "an industrial area",
    "a parking lot", "a stadium", "a bridge", "a desert", "mountains", "a meadow", "clouds", "snow",
    "a solar farm", "a golf course", "a church")]


@dataclass
class BuildReport:
    """What a build or add did."""

    index_dir: str
    added: int = 0
    files: int = 0
    skipped_bad: list[str] = field(default_factory=list)  # messages of unreadable images/tiles
    skipped_nodata: int = 0  # tiles below min_valid
    already_indexed: int = 0
    named_twice: int = 0  # inputs named more than once (embedded once)
    changed_since_indexed: list[str] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """A human summary, one fact a line."""
        out = [f"{self.index_dir}: added {self.added} items from {self.files} files/scenes in {len(self.shards)} "
               f"shard(s) ({self.seconds:.1f} s)"]
        for s in self.shards:
            how = (f"approximate (IVF-Flat, {s['nlist']} lists, nprobe {s['nprobe']}): recall@10 "
                   f"{s['recall_at_10']:.3f} against exact on {s['calibration_queries']} sample queries"
                   if "recall_at_10" in s else s["kind"])
            out.append(f"  {s['name']}: {s['count']} rows, {how}")
        if self.skipped_nodata:
            out.append(f"skipped {self.skipped_nodata} tiles with too few valid pixels (nodata)")
        if self.skipped_bad:
            out.append(f"skipped {len(self.skipped_bad)} unreadable images/tiles (first: {self.skipped_bad[0]})")
        if self.named_twice:
            out.append(f"{self.named_twice} inputs were named more than once; each is indexed once")
        if self.already_indexed:
            out.append(f"skipped {self.already_indexed} files already in the index")
        if self.changed_since_indexed:
            out.append(f"skipped {len(self.changed_since_indexed)} files changed since they were indexed (first: "
                       f"{self.changed_since_indexed[0]}); rebuild the index to refresh them")
        return out


def load_embedder(checkpoint: str, model: str | None = None, dtype: str = "float32", batch_size: int = 64,
                  progress: bool = False, step: int | None = None, best: bool = False,
                  ) -> tuple[Extractor, dict[str, Any]]:
    """An `Extractor` for a checkpoint (with its own tokenizer), and what was loaded (`step`/`best`:
    which checkpoint of a training workdir)."""
    clip, info = load_checkpoint_with_info(checkpoint, model, step=step, best=best, dtype=dtype)
    tokenizer = load_tokenizer(checkpoint, info["format"])
    info["dtype"] = dtype
    return Extractor(clip, batch_size=batch_size, progress=progress, tokenizer=tokenizer), info


def check_same_model(index_dir: str | os.PathLike, manifest: dict[str, Any], extractor: Extractor,
                     info: dict[str, Any]) -> None:
    """Raises ValueError naming both models when `extractor`'s weights are not the index's."""
    if extractor.fingerprint == manifest["fingerprint"]:
        return
    dtype_note = (f"; it was built in {manifest.get('dtype')} and the fingerprint covers the compute dtype, so also "
                  f"pass --dtype {manifest.get('dtype')}" if manifest.get("dtype") != info.get("dtype") else "")
    raise ValueError(
        f"{index_dir} was built with {manifest['model']} from {manifest['checkpoint']} (dtype {manifest.get('dtype')}, "
        f"fingerprint {manifest['fingerprint'][:12]}), not with {info['model']} from {info['checkpoint']} "
        f"(dtype {info.get('dtype')}, fingerprint {extractor.fingerprint[:12]}): embeddings of different models "
        f"are not comparable. Use --checkpoint {manifest['checkpoint']}{dtype_note}, or build a new index with "
        "this model")


def _publishable_folder(index_dir: Path) -> None:
    """A build writes into a new folder, or one left empty (or with orphans) by an interrupted build."""
    if (index_dir / MANIFEST).exists():
        raise ValueError(f"--out {index_dir}: already a search index; add files with `rsclip index add {index_dir} "
                         "FILES...` or choose another folder")
    if index_dir.exists() and not index_dir.is_dir():
        raise ValueError(f"--out {index_dir}: is a file; give a folder for the index")
    if index_dir.is_dir():
        other = [p.name for p in index_dir.iterdir() if not (p.name.startswith(("shard-", ".")) and p.name != MANIFEST)]
        if other:
            raise ValueError(f"--out {index_dir}: folder is not empty ({', '.join(sorted(other)[:3])}); give a new "
                             "or empty folder for the index")


def build_index(index_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], checkpoint: str, *,
                model: str | None = None, dtype: str = "float32", batch_size: int = 64, kind: str = "auto",
                options: Options = Options(), skip_bad: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
                progress: bool = True, step: int | None = None, best: bool = False) -> BuildReport:
    """Embeds the images and scene tiles under `inputs` into a new index at `index_dir`.

    Raises:
        ValueError: for a folder that is already an index or not empty, a bad --kind, nothing to index.
        ImageReadError: for an unreadable input without `skip_bad`, naming it.
    """
    start = time.perf_counter()
    index_dir = Path(index_dir).absolute()
    resolve_kind(kind, 0)  # validates the name before any work
    _publishable_folder(index_dir)
    paths, twice = collect(inputs, options)
    extractor, info = load_embedder(checkpoint, model, dtype, batch_size, step=step, best=best)
    report = BuildReport(str(index_dir), named_twice=twice)
    with _writer_lock(index_dir):
        _publishable_folder(index_dir)
        manifest = {"format": FORMAT, "version": VERSION, "model": info["model"], "checkpoint": info["checkpoint"],
                    "checkpoint_format": info["format"], "fingerprint": extractor.fingerprint, "dtype": dtype,
                    "embed_dim": int(extractor.embed_dim), "image_size": int(extractor.image_size),
                    "preprocessing": PREPROCESSING, "kind": kind, "settings": options.settings(),
                    "step": info.get("step"), "created": now(), "root": None, "count": 0, "shards": []}
        _embed(index_dir, manifest, paths, extractor, kind, options, skip_bad, shard_size, progress, report)
        if report.added == 0:
            raise ValueError(f"nothing to index under {', '.join(map(str, inputs))}: " + "; ".join(report.lines()[1:]))
        if jax.process_index() == 0:
            write_manifest(index_dir, manifest)
    report.seconds = time.perf_counter() - start
    return report


def add_to_index(index_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], *,
                 checkpoint: str | None = None, model: str | None = None, dtype: str | None = None,
                 batch_size: int = 64, options: Options | None = None, skip_bad: bool = False,
                 shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> BuildReport:
    """Adds files not yet in the index as new shards (ids of existing rows do not change).

    Defaults (checkpoint, dtype, tiling, bands, stretch) are the index's own.

    Raises:
        FileNotFoundError: for a folder that is not an index.
        ValueError: when the model is not the one the index was built with (naming both).
    """
    start = time.perf_counter()
    index_dir = Path(index_dir).absolute()
    manifest = read_manifest(index_dir)
    options = options or Options.from_settings(manifest.get("settings", {}))
    paths, twice = collect(inputs, options)
    extractor, info = load_embedder(checkpoint or manifest["checkpoint"], model,
                                    dtype or manifest.get("dtype", "float32"), batch_size,
                                    step=manifest.get("step") if checkpoint is None else None)
    check_same_model(index_dir, manifest, extractor, info)
    report = BuildReport(str(index_dir), named_twice=twice)
    with _writer_lock(index_dir):
        manifest = read_manifest(index_dir)  # as it is now, under the lock
        known = indexed_files(index_dir, manifest)
        new = []
        for p in paths:
            if p not in known:
                new.append(p)
            elif known[p] == file_identity(p):
                report.already_indexed += 1
            else:
                report.changed_since_indexed.append(p)
        _embed(index_dir, manifest, new, extractor, manifest.get("kind", "auto"), options, skip_bad, shard_size,
               progress, report)
        if report.shards and jax.process_index() == 0:
            write_manifest(index_dir, manifest)
    report.seconds = time.perf_counter() - start
    return report


def _writer_lock(index_dir: Path) -> Any:
    """The index lock, taken by process 0 only: on several hosts every process runs the build (each
    embeds its share of each batch) but only process 0 writes."""
    return index_lock(index_dir) if jax.process_index() == 0 else contextlib.nullcontext()


def _common_root(old: str | None, paths: Sequence[str]) -> str | None:
    dirs = {os.path.dirname(p) for p in paths} | ({old} if old else set())
    return os.path.commonpath(sorted(dirs)) if dirs else old


def _embed(index_dir: Path, manifest: dict[str, Any], paths: list[str], extractor: Extractor, kind: str,
           options: Options, skip_bad: bool, shard_size: int, progress: bool, report: BuildReport) -> None:
    """Embeds `paths` into new shards appended to `manifest["shards"]` (the manifest is not written here)."""
    writer = jax.process_index() == 0
    state: dict[str, Any] = {"emb": [], "records": []}
    identities: dict[str, tuple[int | None, int | None]] = {}
    open_scenes: list[Any] = []
    reader = ArchiveReader()
    bar = tqdm(unit="item", desc="indexing", file=sys.stderr, disable=not (progress and writer))

    def bad(message: str) -> None:
        if not skip_bad:
            raise ImageReadError(f"{message} (--skip-bad skips and counts inputs that cannot be read)")
        report.skipped_bad.append(message)
        print(f"warning: skipping {message}", file=sys.stderr)

    def items() -> Any:
        for path in paths:
            identities[path] = file_identity(path)
            if not is_scene_input(path, options):
                yield Item(path, path)
                continue
            try:
                scene, scene_list = scene_items(path, options)
            except (RasterError, OSError) as e:
                bad(str(e))
                continue
            open_scenes.append(scene)
            yield from scene_list

    def flush(rows: int) -> None:
        emb = np.concatenate(state["emb"]) if state["emb"] else np.zeros((0, extractor.embed_dim), np.float32)
        records: list[Record] = state["records"]
        take, rest = emb[:rows], emb[rows:]
        state["emb"], state["records"] = [rest], records[rows:]
        shard_kind = resolve_kind(kind, rows)
        extra = extractor.texts(CALIBRATION_PROMPTS) if shard_kind == "approx" else None
        first_id = sum(s["count"] for s in manifest["shards"])
        name = new_shard_name(len(manifest["shards"]))
        settings = {"settings": options.settings()}
        if writer:
            entry = write_shard(index_dir, name, take, records[:rows], first_id, shard_kind, extra, settings)
        else:
            entry = {"name": name, "first_id": first_id, "count": rows, "kind": shard_kind}
        manifest["shards"].append(entry)
        manifest["root"] = _common_root(manifest.get("root"), [r.path for r in records[:rows]])
        report.shards.append(entry)

    files_done: set[str] = set()
    with ThreadPoolExecutor(extractor.num_threads) as pool:
        for chunk in iter_chunks(items(), max_items=extractor.batch_size * 8, max_bytes=CHUNK_BYTES):
            scene_part = [it for it in chunk if it.scene is not None]
            valid: dict[str, float] = {}
            for it, result in zip(scene_part, pool.map(_try_read, scene_part)):
                if isinstance(result, str):
                    bad(result)
                elif result[1] < options.min_valid or result[1] == 0.0:
                    report.skipped_nodata += 1
                else:
                    reader.ready[it.name], valid[it.name] = result
            todo = [it for it in chunk if it.scene is None or it.name in valid]
            # scenes whose last item is in this chunk are finished (items come in input order)
            for scene in [s for s in open_scenes if chunk and s is not chunk[-1].scene]:
                scene.close()
                open_scenes.remove(scene)
            if todo:
                try:
                    got = extractor.images([it.name for it in todo], skip_missing=skip_bad, reader=reader)
                except ImageReadError as e:
                    raise ImageReadError(str(e).split("; to skip such images")[0] +
                                         "; pass --skip-bad to skip (and count) unreadable images") from None
                report.skipped_bad.extend(got.skipped)
                kept = [todo[i] for i in got.kept]
                recs = list(pool.map(lambda it: record_of(it, valid.get(it.name, 1.0), identities[it.path]), kept)
                            ) if writer else [Record(item=it.name, path=it.path) for it in kept]
                state["emb"].append(got.embeddings)
                state["records"].extend(recs)
                report.added += len(kept)
                files_done.update(it.path for it in kept)
            reader.ready.clear()
            bar.update(len(chunk))
            while len(state["records"]) >= shard_size:
                flush(shard_size)
    for scene in open_scenes:
        scene.close()
    bar.close()
    if state["records"]:
        flush(len(state["records"]))
    report.files = len(files_done)


def _try_read(item: Item) -> tuple[Any, float] | str:
    try:
        return read_item(item)
    except ImageReadError as e:
        return str(e)


__all__ = ["BuildReport", "DEFAULT_SHARD_SIZE", "IndexFormatError", "KINDS", "Options", "add_to_index",
           "build_index", "check_same_model", "load_embedder", "unlisted_shards"]
