"""grain input pipelines over the ArrayRecord shards of `rsclip data build`.

Training: record keys -> per-process share -> seeded shuffle per epoch -> repeat -> read + decode
+ augment + pick one caption (random, seeded per record) -> per-process batch (tokenized) ->
grain iterator (optionally prefetched in worker processes). Batches are
`{"images": uint8 (b, S, S, 3), "tokens": int32 (b, 77)}`; normalise on device
(`rsclip_jax.preprocess.normalize_images`).

Exact resumption: every random choice for a record comes from a generator seeded with
(seed, epoch, record index), and batching happens on the `MapDataset` (before the iterator), so
batch k is a pure function of k. grain's iterator state is then just a position:
`it.get_state()` / `it.set_state(state)` reproduce the same following batches, with or without
worker processes, and `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`
(handler `grain.checkpoint.CheckpointHandler`) store it in an orbax checkpoint.

Multi-host: the training order is global. All processes share one seeded shuffle of all record
keys, and global batch k is positions [kB, (k+1)B) of that stream whatever the topology; process
p of n reads only its block [kB + p*b, kB + (p+1)*b) of each global batch (b = B / n). So the
global batches, and hence the loss curve, are the same on 1 process x 8 devices as on
2 processes x 4, and a run can resume on a different number of processes. `to_global_batch`
assembles the per-process batches into global `jax.Array`s sharded over the mesh's batch axes.

Evaluation: no shuffle, shortest-side resize + center crop (`preprocess_image`, OpenCLIP's eval
transform), first caption, and every process pads to the same number of batches;
`"mask"` marks the real examples and `"index"` gives their record index (-1 for padding).
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from collections.abc import Sequence

import grain
import jax
from absl import flags
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from rsclip_jax.data import shards
from rsclip_jax.data.augment import AugmentConfig, decode_and_augment
from rsclip_jax.preprocess import preprocess_image
from rsclip_jax.tokenizer import CONTEXT_LENGTH, PAD_TOKEN_ID, get_tokenizer, trimmed_length

# A corrupt record is replaced by the next readable one among this many (more: the shards are broken).
MAX_SUBSTITUTE_TRIES = 16
DEFAULT_AUGMENT = AugmentConfig()  # OpenCLIP's train crop at 224 px plus flips and 90° rotations


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How the host runs the pipeline. worker_count=0 (in-process) was fastest on 2 cores."""

    worker_count: int = 0  # grain worker processes (mp_prefetch); 0: in the training process
    read_threads: int = 2  # threads computing batches in each process (PIL releases the GIL)
    prefetch_batches: int = 2  # batches computed ahead in each process
    worker_buffer_batches: int = 2  # batches each worker process keeps ready


def default_shard_options(drop_remainder: bool) -> grain.sharding.ShardOptions:
    """This JAX process's share of the records: `ShardByJaxProcess`."""
    return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)


def shard_range(num_records: int, options: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, end) of the record keys that process `options.shard_index` reads (contiguous split).

    With drop_remainder every share has num_records // shard_count keys; without it the first
    num_records % shard_count shares get one more, so the shares cover all keys exactly once.
    """
    per, rem = divmod(num_records, options.shard_count)
    i = options.shard_index
    if options.drop_remainder:
        return i * per, (i + 1) * per
    start = i * per + min(i, rem)
    return start, start + per + (1 if i < rem else 0)


class CorruptRecordError(ValueError):
    """A training record that cannot be read or decoded (names its shard file and index)."""


class _ReadRecord:
    """Random access to serialised records (picklable, for grain worker processes)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self.source = grain.sources.ArrayRecordDataSource(self.paths)

    def header_and_image(self, key: int) -> tuple[dict, bytes]:
        data = self.source[key]
        header, start = shards.decode_header(data)
        return header, data[start:]

    def locate(self, key: int) -> str:
        """'SHARD record I' for a global record key (counted only on this error path)."""
        for path in self.paths:
            count = num_records([path])
            if key < count:
                return f"{path} record {key}"
            key -= count
        return f"record {key} past the end of the shards"


class _TrainExample(_ReadRecord):
    """The example at a process-local position: its block of the global stream, decoded."""

    def __init__(self, paths: Sequence[str], augment: AugmentConfig, seed: int, epoch_length: int,
                 keys: grain.MapDataset, shard_count: int, shard_index: int, block: int,
                 skip_corrupt: int = 0) -> None:
        super().__init__(paths)
        self.augment, self.seed, self.epoch_length = augment, seed, epoch_length
        self.keys, self.count, self.index, self.block = keys, shard_count, shard_index, block
        self.skip_corrupt = skip_corrupt

    def __call__(self, local: int) -> tuple:
        position = (local // self.block) * self.count * self.block + self.index * self.block + local % self.block
        key = int(self.keys[position])
        epoch = position // self.epoch_length
        try:
            example = self._example(key, epoch)
        except Exception as e:  # noqa: BLE001 - a damaged record fails in many ways (read, header, image)
            if not self.skip_corrupt:
                raise CorruptRecordError(
                    f"corrupt training record: {self.locate(key)}: {type(e).__name__}: {e}. Rebuild the shards "
                    "(`rsclip data build`), or set --config.data.skip_corrupt=N to skip up to N such records") from e
            example = self._substitute(key, epoch, e)
        # with skipping on, every example says whether it stands in for a corrupt record (counted
        # by the train step, so every process sees the same total)
        return (*example, False) if self.skip_corrupt and len(example) == 2 else example

    def _example(self, key: int, epoch: int) -> tuple[np.ndarray, str]:
        rng = np.random.default_rng([self.seed, epoch, key])  # per record: exact on restore
        header, image = self.header_and_image(key)
        pixels = decode_and_augment(image, self.augment, rng)
        captions = header["captions"]
        return pixels, captions[int(rng.integers(len(captions)))]

    def _substitute(self, key: int, epoch: int, error: Exception) -> tuple[np.ndarray, str, bool]:
        """The next readable record after a corrupt one: a pure function of the key, so batches keep
        their shape and a resumed run sees the same examples."""
        print(f"[data] skipping corrupt training record {self.locate(key)} ({type(error).__name__}: {error}); "
              "data.skip_corrupt allows it", file=sys.stderr, flush=True)
        size = len(self.source)
        for step in range(1, min(size, MAX_SUBSTITUTE_TRIES + 1)):
            try:
                return (*self._example((key + step) % size, epoch), True)
            except Exception:  # noqa: BLE001
                continue
        raise CorruptRecordError(f"corrupt training record {self.locate(key)}, and the {MAX_SUBSTITUTE_TRIES} records "
                                 "after it are corrupt too: rebuild the shards with `rsclip data build`")


class _EvalExample(_ReadRecord):
    def __init__(self, paths: Sequence[str], image_size: int, start: int, count: int) -> None:
        super().__init__(paths)
        self.image_size, self.start, self.count = image_size, start, count

    def __call__(self, position: int) -> tuple[np.ndarray, str, int, bool]:
        if position >= self.count:  # padding up to the common number of batches
            return np.zeros((self.image_size, self.image_size, 3), np.uint8), "", -1, False
        key = self.start + position
        header, image = self.header_and_image(key)
        with Image.open(io.BytesIO(image)) as img:
            pixels = preprocess_image(img, self.image_size)
        return pixels, header["captions"][0], key, True


class _Collate:
    """Stacks images (copying any flipped/rotated views) and tokenizes the captions of a batch."""

    def __init__(self, context_length: int) -> None:
        self.context_length = context_length

    def __call__(self, examples: Sequence[tuple]) -> dict[str, np.ndarray]:
        batch = {
            "images": np.stack([e[0] for e in examples]),
            "tokens": get_tokenizer()([e[1] for e in examples], self.context_length),
        }
        if len(examples[0]) == 3:  # training with data.skip_corrupt: which examples stand in for corrupt ones
            batch["corrupt"] = np.array([e[2] for e in examples], bool)
        elif len(examples[0]) == 4:  # evaluation
            batch["index"] = np.array([e[2] for e in examples], np.int32)
            batch["mask"] = np.array([e[3] for e in examples], bool)
        return batch


def _to_iter_dataset(ds: grain.MapDataset, loader: LoaderConfig) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=loader.read_threads,
                                              prefetch_buffer_size=loader.prefetch_batches))
    if loader.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app nobody parsed them
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=loader.worker_count,
                                                         per_worker_buffer_size=loader.worker_buffer_batches))
    return it


def train_examples(
    paths: Sequence[str],
    *,
    seed: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
    augment: AugmentConfig = DEFAULT_AUGMENT,
    shard_options: grain.sharding.ShardOptions | None = None,
    block: int = 1,
    skip_corrupt: int = 0,
) -> grain.MapDataset:
    """This process's stream of (augmented uint8 image, chosen caption) examples, unbatched.

    The global stream (one seeded shuffle of all records per epoch) is dealt out in blocks of
    `block` positions: process p gets blocks p, p + n, p + 2n, ... With drop_remainder only whole
    rounds of n blocks are dealt, so every process gets the same number of examples.
    """
    options = default_shard_options(drop_remainder=True) if shard_options is None else shard_options
    num = len(grain.sources.ArrayRecordDataSource(list(paths)))
    n, p = options.shard_count, options.shard_index
    if num < n * block and options.drop_remainder and num_epochs is not None:
        raise ValueError(f"{num} records cannot fill a batch of {block} on each of {n} processes")
    keys = grain.MapDataset.range(num)
    if shuffle:
        keys = keys.shuffle(seed=seed)  # grain reshuffles each epoch (seed + epoch)
    keys = keys.repeat(num_epochs)
    rounds, rest = divmod(len(keys), n * block)
    local = rounds * block + (0 if options.drop_remainder else min(max(rest - p * block, 0), block))
    return grain.MapDataset.range(local).map(_TrainExample(paths, augment, seed, num, keys, n, p, block, skip_corrupt))


def train_dataset(
    paths: Sequence[str],
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
    augment: AugmentConfig = DEFAULT_AUGMENT,
    shard_options: grain.sharding.ShardOptions | None = None,
    context_length: int = CONTEXT_LENGTH,
    loader: LoaderConfig = LoaderConfig(),
    skip_corrupt: int = 0,
) -> grain.IterDataset:
    """Per-process training batches (see the module docstring); `iter()` it for a checkpointable iterator.

    Args:
        paths: shard files, e.g. `shards.shard_paths(build_dir)`.
        batch_size: examples per batch *per process* (global batch / process count).
        seed: shuffles and augmentation; the same on every process.
        num_epochs: None repeats forever. The last incomplete batch is dropped.
        shard_options: this process's share; default `ShardByJaxProcess(drop_remainder=True)`.
        skip_corrupt: 0 raises CorruptRecordError (naming shard and index) at a record that cannot
            be read; > 0 replaces it by the next readable record and marks it in `batch["corrupt"]`
            (the limit itself is enforced by the training loop, over all processes).
    """
    examples = train_examples(paths, seed=seed, num_epochs=num_epochs, shuffle=shuffle, augment=augment,
                              shard_options=shard_options, block=batch_size, skip_corrupt=skip_corrupt)
    batches = examples.batch(batch_size, drop_remainder=True, batch_fn=_Collate(context_length))
    return _to_iter_dataset(batches, loader)


def eval_dataset(
    paths: Sequence[str],
    *,
    batch_size: int,
    image_size: int = 224,
    shard_options: grain.sharding.ShardOptions | None = None,
    context_length: int = CONTEXT_LENGTH,
    loader: LoaderConfig = LoaderConfig(),
) -> grain.IterDataset:
    """Deterministic per-process eval batches with "images", "tokens" (first caption), "index", "mask".

    Every process yields ceil(ceil(records / processes) / batch_size) batches (so collective
    evaluation steps line up); positions past a process's share are zero images with mask False.
    """
    options = default_shard_options(drop_remainder=False) if shard_options is None else shard_options
    n = len(grain.sources.ArrayRecordDataSource(list(paths)))
    # Evaluation never drops records: padding evens out the shares instead.
    start, end = shard_range(n, grain.sharding.ShardOptions(options.shard_index, options.shard_count))
    largest_share = -(-n // options.shard_count)
    num_batches = -(-largest_share // batch_size)
    ds = grain.MapDataset.range(num_batches * batch_size).map(_EvalExample(paths, image_size, start, end - start))
    return _to_iter_dataset(ds.batch(batch_size, batch_fn=_Collate(context_length)), loader)


def trim_text_padding(batch: dict[str, np.ndarray], multiple: int, width: int | None = None) -> dict[str, np.ndarray]:
    """``batch`` with its "tokens" cut to `trimmed_length` (the same features, less work), or to
    ``width`` when one is given.

    A global batch needs one width on every process, and agreeing on it every step would be a
    collective the host waits on, which stops it from preparing the next batch while the device
    runs. So a multi-process run cuts every batch to one ``width`` fixed at start, from the
    longest caption the shards' manifests record (`shards.max_caption_tokens`), and without one
    keeps the batch as it is (docs/training.md, "Caption padding").

    Raises:
        ValueError: a caption of the batch is longer than ``width``.
    """
    tokens = batch["tokens"]
    if width is None:
        if jax.process_count() > 1:
            return batch
        width = trimmed_length(tokens, multiple)
    elif width < tokens.shape[1] and np.any(tokens[:, width:] != PAD_TOKEN_ID):
        longest = trimmed_length(tokens, 1)
        raise ValueError(f"a caption of this batch takes {longest} tokens, more than the {width} the shards' "
                         "manifests allow (max_caption_tokens): rebuild the shards with `rsclip data build`, or "
                         "set --config.data.trim_text_multiple=0 to keep every token")
    return batch if width >= tokens.shape[1] else {**batch, "tokens": tokens[:, :width]}


def to_global_batch(batch: dict[str, np.ndarray], mesh: Mesh,
                    batch_axes: str | Sequence[str] = ("data",)) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global `jax.Array`s, dimension 0 sharded over `batch_axes`.

    Every process passes its own batch; the global batch is their concatenation in process order.
    """
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def num_records(paths: Sequence[str]) -> int:
    """Records in the given shard files."""
    return len(grain.sources.ArrayRecordDataSource([os.fspath(p) for p in paths]))
