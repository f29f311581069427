"""Embedding extraction for evaluation: sharded over a mesh and its hosts, cached on disk.

Every global batch has the same shape (so each function compiles once) and is split over all
devices of the mesh, on every host; each host decodes only the rows its own devices hold. Rows
past the end of the data, and images that could not be read (with `skip_missing`), are zeros with
a False mask. The outputs and masks come back replicated, i.e. gathered to every host, and are
trimmed to the real rows.

Results are cached as `<cache_dir>/<sha256>.npz`, keyed by (model fingerprint, items,
preprocessing): the fingerprint hashes the architecture and every parameter, images are identified
by path, size and mtime, texts by their exact strings. Training evals pass `cache_dir=None`.

This is the one embedding engine of the project: `rsclip embed`/`classify`, the evaluator and the
evals inside training all use it. During training it runs on the training mesh with the weights
sharded exactly as training shards them (FSDP and tensor-parallel layouts included): XLA gathers
what each layer needs, and no device holds a full copy unless training does. Long inputs show a
progress bar on process 0.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from PIL import Image
from tqdm import tqdm

from rsclip_jax.fileio import atomic_write_npz
from rsclip_jax.models import CLIP
from rsclip_jax.models.clip import MAX_LOGIT_SCALE
from rsclip_jax.models.layers import batch_sharded_activations
from rsclip_jax.preprocess import ImageReadError, load_image, normalize_images, preprocess_image
from rsclip_jax.raster import RasterError, is_raster_name, read_image
from rsclip_jax.tokenizer import get_tokenizer

# Bump when the preprocessing or the cache layout changes, so stale entries are never read.
CACHE_VERSION = 1
PREPROCESSING = "openai-eval: bicubic shortest side, center crop, OpenAI mean/std"


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/rsclip_jax/embeddings` (default `~/.cache/rsclip_jax/embeddings`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rsclip_jax", "embeddings")


def model_fingerprint(model: CLIP, state: Any = None) -> str:
    """sha256 over the architecture, the compute dtype and every parameter's bytes.

    `state` (default: the model's) may be any copy of the weights whose arrays this host can read,
    e.g. a replicated one when training shards the model's own arrays over hosts.
    """
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(getattr(model, "dtype", "")).encode())
    for path, leaf in jax.tree.leaves_with_path(nnx.state(model) if state is None else state):
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class TextTokenizer(Protocol):
    """What `Extractor` tokenizes with (`rsclip_jax.tokenizer.Tokenizer`, a transformers folder's)."""

    identity: str  # changes whenever the ids of some text would

    def __call__(self, texts: Sequence[str], context_length: int) -> np.ndarray:
        """(N, context_length) integer token ids."""


class ImageReader(Protocol):
    """Where `Extractor.images` gets its images: files (`FileReader`) or, e.g., TFDS records."""

    def identity(self, item: str) -> Any:
        """JSON-able cache identity of an item; it must change when the item's content does."""

    def read(self, item: str) -> Image.Image:
        """The item's image as RGB; raises `ImageReadError` naming the item."""


class FileReader:
    """Image files: identified by (absolute path, size, mtime), read by `load_image`."""

    def identity(self, item: str) -> Any:
        return _file_id(item)

    def read(self, item: str) -> Image.Image:
        return load_image(item)


class RasterFileReader(FileReader):
    """Image files with a chosen band selection and stretch (`--bands`, `--scale`, `--gamma`).

    Rasters (GeoTIFF, COG, JP2), folders of band files and STAC item JSON are read whole through
    `rsclip_jax.raster`; other files as `FileReader` reads them. The choice is part of the cache
    identity, so another band selection is embedded again.
    """

    def __init__(self, bands: Sequence[int] | Sequence[str] | None = None,
                 scale: tuple[float, float] | None = None, gamma: float = 1.0):
        self.bands, self.scale, self.gamma = bands, scale, gamma

    def identity(self, item: str) -> Any:
        files = sorted(os.path.join(item, f) for f in os.listdir(item)) if os.path.isdir(item) else [item]
        return [[_file_id(f) for f in files], list(self.bands or []), list(self.scale or []), self.gamma]

    def read(self, item: str) -> Image.Image:
        if not (is_raster_name(item) or os.path.isdir(item) or item.lower().endswith(".json")):
            return load_image(item)
        try:
            return Image.fromarray(read_image(item, self.bands, self.scale, Image.MAX_IMAGE_PIXELS, self.gamma), "RGB")
        except RasterError as e:
            raise ImageReadError(str(e)) from None


@dataclass(frozen=True)
class ImageEmbeddings:
    """Embeddings of the readable images, and which inputs they are."""

    embeddings: np.ndarray  # (N_kept, D) float32, L2-normalised
    kept: np.ndarray  # (N_kept,) indices into the input paths
    skipped: list[str]  # input paths that could not be read (only with skip_missing)


def default_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every host."""
    return jax.sharding.Mesh(np.array(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class Extractor:
    """Embeds images and texts with a CLIP model, sharded over `mesh`.

    Args:
        model: the CLIP model; weights already on `mesh` keep their sharding, others are
            replicated over it.
        batch_size: global batch, rounded up to a multiple of the mesh size.
        mesh: any mesh (e.g. training's (data, fsdp, model) mesh): the batch is split over all its
            axes. Default: every device of every host.
        cache_dir: where embeddings are cached; None disables the disk cache.
        num_threads: image decoding threads per host.
        progress: show a progress bar (process 0) for inputs longer than one batch.
        tokenizer: texts -> (N, context_length) ids, with an `identity` string for the cache key
            (default: OpenAI's BPE as open_clip tokenizes; `rsclip_jax.checkpoint.load_tokenizer`
            gives a transformers folder's own).
    """

    def __init__(self, model: CLIP, batch_size: int = 64, mesh: jax.sharding.Mesh | None = None,
                 cache_dir: str | None = None, num_threads: int | None = None, progress: bool = True,
                 tokenizer: TextTokenizer | None = None):
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        self.mesh = mesh if mesh is not None else default_mesh()
        n = self.mesh.devices.size
        self.batch_size = -(-batch_size // n) * n
        self.cache_dir = cache_dir
        self.num_threads = num_threads or min(8, (os.cpu_count() or 1) + 1)
        self.progress = progress
        self._replicated = NamedSharding(self.mesh, P())
        self._batch = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
        # Which global rows of a batch each local device holds; this host loads only those rows.
        index_map = self._batch.addressable_devices_indices_map((self.batch_size,))
        self._local = [(d, np.arange(self.batch_size)[idx[0]]) for d, idx in index_map.items()]
        self._host_rows = np.unique(np.concatenate([rows for _, rows in self._local]))
        self._graphdef: Any = None
        self.set_model(model)

    def set_model(self, model: CLIP) -> None:
        """Swaps in new weights; same architecture recompiles nothing (e.g. during training)."""
        graphdef, state = nnx.split(model)
        if graphdef != self._graphdef:  # a new architecture: its functions (compiled once per mesh)
            self._graphdef = graphdef
            self._images_fn, self._texts_fn = _compiled(graphdef, self.mesh)
        self.model = model
        self._state = _on_mesh(state, self.mesh, self._replicated)
        self.logit_scale = float(min(np.exp(np.asarray(self._state["logit_scale"][...])), MAX_LOGIT_SCALE))
        self.embed_dim = model.config.embed_dim
        self.image_size = model.config.vision.image_size
        self.context_length = model.config.text.context_length
        self._fingerprint: str | None = None
        self._memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            readable = lambda x: getattr(x, "is_fully_addressable", True) or x.is_fully_replicated  # noqa: E731
            if not all(readable(x) for x in jax.tree.leaves(self._state)):
                # weights sharded over hosts (as training may hold them) cannot be hashed by one host
                raise ValueError("the embedding cache needs weights every host can read; pass cache_dir=None "
                                 "for a model sharded over several processes")
            self._fingerprint = model_fingerprint(self.model, self._state)
        return self._fingerprint

    # -- public API ---------------------------------------------------------------------------

    def images(self, paths: Sequence[str], skip_missing: bool = False,
               reader: ImageReader | None = None) -> ImageEmbeddings:
        """Embeds image files (the eval transform at the model's resolution).

        `reader` reads items that are not files, e.g. the records of a prepared TFDS dataset
        (`rsclip_jax.data.tfds_prepared.RecordImages`); `paths` are then its item names.

        Raises:
            ImageReadError: naming the first unreadable file, without `skip_missing`. It is raised
                after the gather, on every host, so no host is left waiting in a collective.
        """
        paths = [os.fspath(p) for p in paths]
        reader = reader or FileReader()
        key = self._key("image", {"items": [reader.identity(p) for p in paths], "image_size": self.image_size,
                                  "preprocessing": PREPROCESSING})
        errors: dict[str, str] = {}
        emb, valid = self._cached(key, lambda: self._run_images(paths, errors, reader))
        bad = [paths[i] for i in np.flatnonzero(~valid)]
        if bad and not skip_missing:
            raise ImageReadError(errors.get(bad[0], f"{bad[0]}: cannot read image") +
                                 (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") +
                                 "; to skip such images pass --skip-bad (embed, classify) or --skip-missing (eval)")
        for path in bad if jax.process_index() == 0 else ():
            print(f"warning: skipping unreadable image: {errors.get(path, path)}", file=sys.stderr)
        kept = np.flatnonzero(valid)
        return ImageEmbeddings(emb[kept], kept, bad)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """(M, D) float32 L2-normalised text embeddings, in input order."""
        texts = list(texts)
        key = self._key("text", {"items": texts, "context_length": self.context_length,
                                 "tokenizer": self.tokenizer.identity})

        def compute() -> tuple[np.ndarray, np.ndarray]:
            tokens = self.tokenizer(texts, context_length=self.context_length)

            def load(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                ok = rows < len(tokens)
                out = np.zeros((len(rows), tokens.shape[1]), tokens.dtype)
                out[ok] = tokens[rows[ok]]
                return out, ok

            return self._run(self._texts_fn, len(texts), load, tokens.shape[1:], tokens.dtype)

        return self._cached(key, compute)[0]

    def classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """Zero-shot class embeddings (C, D): each class's prompt embeddings averaged, renormalised."""
        prompts = [t.format(c) for c in classnames for t in templates]
        emb = self.texts(prompts).reshape(len(classnames), len(templates), -1).mean(axis=1)
        return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

    # -- internals ------------------------------------------------------------------------------

    def _key(self, kind: str, what: dict[str, Any]) -> str:
        # The memo is per model (cleared by set_model); the disk key adds the model fingerprint.
        blob = json.dumps({"v": CACHE_VERSION, "kind": kind, **what}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cached(self, key: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if key in self._memo:
            return self._memo[key]
        path = None
        if self.cache_dir is not None:
            disk_key = hashlib.sha256(f"{self.fingerprint}:{key}".encode()).hexdigest()
            path = os.path.join(self.cache_dir, f"{disk_key}.npz")
            # Every host must agree, or some would wait in a collective the others skip.
            if _all_hosts(os.path.isfile(path)):
                with np.load(path) as f:
                    self._memo[key] = (f["embeddings"], f["valid"])
                return self._memo[key]
        result = compute()
        if path is not None and jax.process_index() == 0:
            # atomic: a concurrent reader never sees half a file
            atomic_write_npz(path, {"embeddings": result[0], "valid": result[1]})
        self._memo[key] = result
        return result

    def _run_images(self, paths: list[str], errors: dict[str, str], reader: ImageReader,
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Unreadable images are masked out (this host records why in `errors`), never raised here."""
        size = self.image_size
        with ThreadPoolExecutor(self.num_threads) as pool:
            def decode(i: int) -> np.ndarray | None:
                try:
                    return preprocess_image(reader.read(paths[i]), size)
                except ImageReadError as e:
                    errors[paths[i]] = str(e)
                    return None

            def submit(rows: np.ndarray) -> list[Any]:
                return [pool.submit(decode, int(i)) if i < len(paths) else None for i in rows]

            def collect(futures: list[Any]) -> tuple[np.ndarray, np.ndarray]:
                out = np.zeros((len(futures), size, size, 3), np.uint8)
                ok = np.zeros(len(futures), bool)
                for j, f in enumerate(futures):
                    img = f.result() if f is not None else None
                    if img is not None:
                        out[j], ok[j] = img, True
                return out, ok

            return self._run(self._images_fn, len(paths), collect, (size, size, 3), np.uint8, submit=submit)

    def _run(self, fn: Any, n: int, load: Callable[[Any], tuple[np.ndarray, np.ndarray]],
             item_shape: tuple[int, ...], dtype: Any, submit: Callable[[np.ndarray], Any] | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
        """Runs `fn` over n rows in global batches; `submit(rows)` starts loading them (prefetch)."""
        submit = submit or (lambda rows: rows)
        B = self.batch_size
        starts = list(range(0, n, B))
        # Two batches in flight: decoding the next while the device computes this one.
        pending = deque((s, submit(s + self._host_rows)) for s in starts[:2])
        position = {int(r): j for j, r in enumerate(self._host_rows)}
        select = [(device, [position[int(r)] for r in rows]) for device, rows in self._local]
        outs, masks = [], []
        bar = tqdm(total=n, unit="item", file=sys.stderr, leave=False,
                   disable=not (self.progress and n > B and jax.process_index() == 0))
        for i, _ in enumerate(starts):
            start, handle = pending.popleft()
            if i + 2 < len(starts):
                pending.append((starts[i + 2], submit(starts[i + 2] + self._host_rows)))
            data, ok = load(handle)
            ok = ok & (start + self._host_rows < n)
            x_shards, m_shards = [], []
            for device, sel in select:
                x_shards.append(jax.device_put(np.ascontiguousarray(data[sel]).astype(dtype, copy=False), device))
                m_shards.append(jax.device_put(ok[sel], device))
            x = jax.make_array_from_single_device_arrays((B, *item_shape), self._batch, x_shards)
            m = jax.make_array_from_single_device_arrays((B,), self._batch, m_shards)
            out, mask = fn(self._state, x, m)
            outs.append(out)
            masks.append(mask)
            bar.update(min(B, n - start))
        bar.close()
        if not outs:
            return np.zeros((0, self.embed_dim), np.float32), np.zeros((0,), bool)
        emb = np.concatenate([np.asarray(o) for o in outs])[:n]
        valid = np.concatenate([np.asarray(m) for m in masks])[:n]
        return emb.astype(np.float32), valid


@functools.lru_cache(maxsize=16)
def _compiled(graphdef: Any, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """The jitted (images, texts) functions of an architecture on a mesh, shared by every Extractor:
    evaluating several checkpoints of one architecture compiles once."""
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(tuple(mesh.axis_names)))

    def masked(encode: Callable[[Any, jax.Array], jax.Array]) -> Callable[..., Any]:
        def fn(state: Any, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
            # As in the train step: with FSDP-sharded weights, XLA would otherwise replicate the batch
            # inside the layer scan and all-reduce whole activations instead of gathering weights.
            with batch_sharded_activations(rows):
                emb = encode(nnx.merge(graphdef, state), x)
            return jnp.where(mask[:, None], emb, 0.0), mask

        # Inputs keep the shardings they arrive with (weights as training shards them, batches over
        # every mesh axis); replicated outputs: XLA gathers every row to every device and host.
        return jax.jit(fn, out_shardings=(replicated, replicated))

    return (masked(lambda m, x: m.encode_image(normalize_images(x), normalize=True)),
            masked(lambda m, x: m.encode_text(x, normalize=True)))


def _on_mesh(state: Any, mesh: jax.sharding.Mesh, replicated: NamedSharding) -> Any:
    """The weights on `mesh`: arrays already laid out on it (e.g. sharded by training, FSDP
    included) stay as they are, so no device ever holds more of the model than training gives it;
    anything else (host arrays, another device or mesh) is replicated over the mesh."""
    def place(x: Any) -> Any:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, state)


def _file_id(path: str) -> tuple[str, int, int] | tuple[str, None, None]:
    """(absolute path, size, mtime_ns): a changed file gets a new cache entry."""
    try:
        st = os.stat(path)
        return (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    except OSError:
        return (os.path.abspath(path), None, None)


def _all_hosts(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.array([flag]))))
