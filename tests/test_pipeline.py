"""grain pipelines: batches, exact resume (in-process, worker processes, orbax), multi-process shares,
eval padding, augmentation, and global jax.Arrays."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from rsclip_jax.data import pipeline, shards
from rsclip_jax.data.augment import (
    AugmentConfig,
    decode_and_augment,
    random_flip_rotate,
    random_resized_crop_box,
)
from rsclip_jax.data.build import BuildConfig, build
from rsclip_jax.preprocess import preprocess_image
from rsclip_jax.tokenizer import tokenize

TILES = Path(__file__).resolve().parent.parent / "data" / "samples" / "tiles"
SIZE = 32
AUG = AugmentConfig(image_size=SIZE)


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The 7 sample tiles (stored at 96 px) with 3 distinct captions each, in 3 shards."""
    d = tmp_path_factory.mktemp("tiles")
    with open(d / "tiles.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for p in sorted(TILES.iterdir()):
            shutil.copy(p, d / p.name)
            writer.writerows((p.name, f"{p.stem} caption {j}") for j in range(3))
    out = d / "out"
    build(BuildConfig(csvs=(str(d / "tiles.csv"),), out_dir=str(out), records_per_shard=3, image_size=96, workers=1))
    return shards.shard_paths(out)


def _record_of_caption(shard_files: list[str]) -> dict[str, int]:
    """caption -> record index (captions are unique per record in the fixture)."""
    records = [shards.decode_record(r) for p in shard_files for r in shards.read_shard(p)]
    return {c: i for i, r in enumerate(records) for c in r.captions}


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _train(shard_files, **kw) -> grain.IterDataset:
    kw.setdefault("shard_options", grain.sharding.NoSharding())
    return pipeline.train_dataset(shard_files, batch_size=2, seed=7, augment=AUG, **kw)


def test_train_batches_hold_uint8_images_and_tokens_of_one_caption(shard_files):
    captions = _record_of_caption(shard_files)
    batches = _take(iter(_train(shard_files)), 4)
    for b in batches:
        assert b.keys() == {"images", "tokens"}
        assert b["images"].dtype == np.uint8 and b["images"].shape == (2, SIZE, SIZE, 3)
        assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (2, 77)
    all_tokens = {tuple(tokenize(c)[0]): c for c in captions}
    chosen = [all_tokens[tuple(row)] for b in batches for row in b["tokens"]]
    assert len({c.split(" caption ")[0] for c in chosen[:7]}) == 7  # the first epoch shows every record once
    assert len({c.rsplit(" ", 1)[1] for c in chosen}) > 1  # captions are picked at random, not always the first


def test_restored_iterator_state_gives_exactly_the_same_batches(shard_files):
    it = iter(_train(shard_files))
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 6)  # 3 batches per epoch: this crosses two epoch boundaries
    restored = iter(_train(shard_files))
    restored.set_state(state)
    _assert_same(_take(restored, 6), expected)
    # Each epoch is shuffled differently.
    epochs = [np.concatenate([b["tokens"] for b in _take(iter(_train(shard_files, num_epochs=2)), 6)])[i:i + 6]
              for i in (0, 6)]
    assert not np.array_equal(epochs[0], epochs[1])


def test_resume_with_worker_processes_and_orbax(shard_files, tmp_path):
    import orbax.checkpoint as ocp

    in_process = _take(iter(_train(shard_files)), 5)
    ds = _train(shard_files, loader=pipeline.LoaderConfig(worker_count=1))
    it = iter(ds)
    try:
        _assert_same(_take(it, 2), in_process[:2])  # workers do not change the batches
        manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                                        item_handlers={"data": grain.checkpoint.CheckpointHandler()})
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    finally:
        it.close()
    restored = iter(ds)  # the state's layout depends on worker_count: restore into the same configuration
    try:
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
        _assert_same(_take(restored, 3), in_process[2:5])
    finally:
        restored.close()


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_two_processes_read_disjoint_shares_covering_one_epoch(shard_files, drop_remainder):
    captions = _record_of_caption(shard_files)
    seen = []
    for index in range(2):
        options = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=drop_remainder)
        examples = pipeline.train_examples(shard_files, seed=3, num_epochs=1, augment=AUG, shard_options=options)
        seen.append([captions[caption] for _, caption in examples])
    assert not set(seen[0]) & set(seen[1])
    if drop_remainder:
        assert len(seen[0]) == len(seen[1]) == 3
    else:
        assert sorted(seen[0] + seen[1]) == list(range(7))
    assert [pipeline.shard_range(7, grain.sharding.ShardOptions(i, 2)) for i in range(2)] == [(0, 4), (4, 7)]


def test_augmentation_depends_only_on_seed_epoch_and_record(shard_files):
    """The same record in the same epoch looks the same whichever process reads it."""
    captions = _record_of_caption(shard_files)
    one = {captions[c]: img for img, c in pipeline.train_examples(shard_files, seed=3, num_epochs=1, augment=AUG,
                                                                   shard_options=grain.sharding.NoSharding())}
    options = grain.sharding.ShardOptions(shard_index=1, shard_count=2)
    share = pipeline.train_examples(shard_files, seed=3, num_epochs=1, augment=AUG, shard_options=options)
    for img, caption in share:
        np.testing.assert_array_equal(img, one[captions[caption]])


def test_eval_is_deterministic_padded_and_masked(shard_files):
    records = [shards.decode_record(r) for p in shard_files for r in shards.read_shard(p)]
    per_process = []
    for index in range(2):
        options = grain.sharding.ShardOptions(shard_index=index, shard_count=2)
        batches = list(pipeline.eval_dataset(shard_files, batch_size=3, image_size=SIZE, shard_options=options))
        assert len(batches) == 2  # ceil(ceil(7 / 2) / 3): the same on both processes
        per_process.append(batches)
    mask = np.concatenate([b["mask"] for b in per_process[1]])
    assert mask.tolist() == [True, True, True, False, False, False]
    assert np.concatenate([b["index"] for b in per_process[1]]).tolist() == [4, 5, 6, -1, -1, -1]
    first = per_process[0][0]
    for row, key in enumerate(first["index"]):
        with Image.open(io.BytesIO(records[key].image)) as img:
            np.testing.assert_array_equal(first["images"][row], preprocess_image(img, SIZE))
        np.testing.assert_array_equal(first["tokens"][row], tokenize(records[key].captions[0])[0])
    again = list(pipeline.eval_dataset(shard_files, batch_size=3, image_size=SIZE,
                                       shard_options=grain.sharding.ShardOptions(0, 2)))
    _assert_same(again, per_process[0])


def test_random_resized_crop_box_follows_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(400, 300, (0.9, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left <= 400 - w and 0 <= top <= 300 - h
        assert 0.9 * 400 * 300 * 0.98 <= w * h <= 400 * 300 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert random_resized_crop_box(1000, 100, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (433, 0, 133, 100)  # fallback


def test_flip_rotate_is_one_pil_transpose_equal_to_numpy():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    seen = set()
    for seed in range(64):
        draws = np.random.default_rng(seed)
        k, h, v = int(draws.integers(0, 4)), draws.random() < 0.5, draws.random() < 0.5
        want = np.rot90(pixels, k)
        want = want[:, ::-1] if h else want
        want = want[::-1] if v else want
        got = np.asarray(random_flip_rotate(image, AUG, np.random.default_rng(seed)))
        np.testing.assert_array_equal(got, want)
        seen.add(got.tobytes())
    assert len(seen) == 8
    off = AugmentConfig(hflip=False, vflip=False, rot90=False)
    assert random_flip_rotate(image, off, np.random.default_rng(0)) is image


def test_jpeg_draft_decode_matches_full_decode():
    """DCT-scaled decoding must crop the same region: compare with draft off on a large JPEG."""
    big = Image.open(TILES / "deepforest_OSBS_029.png").convert("RGB").resize((1600, 1200), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95)
    no_flip = AugmentConfig(hflip=False, vflip=False, rot90=False)
    for seed in range(3):
        fast = decode_and_augment(buf.getvalue(), no_flip, np.random.default_rng(seed))
        exact = decode_and_augment(buf.getvalue(), AugmentConfig(hflip=False, vflip=False, rot90=False,
                                                                  jpeg_draft=False), np.random.default_rng(seed))
        assert fast.shape == exact.shape == (224, 224, 3)
        assert np.abs(fast.astype(int) - exact.astype(int)).mean() < 4


def test_to_global_batch_shards_the_batch_dimension():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    n = len(jax.devices())
    local = {"images": np.arange(n * 2 * 4 * 4 * 3, dtype=np.uint8).reshape(n * 2, 4, 4, 3),
             "tokens": np.ones((n * 2, 77), np.int32)}
    out = pipeline.to_global_batch(local, mesh, "data")
    assert out["images"].shape == (n * 2, 4, 4, 3) and out["tokens"].dtype == np.int32
    assert out["images"].sharding.spec == jax.sharding.PartitionSpec(("data",))
    np.testing.assert_array_equal(np.asarray(out["images"]), local["images"])


_DISTRIBUTED_WORKER = """
import json, sys
import jax, numpy as np
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
from rsclip_jax.data import pipeline
paths = json.loads(sys.argv[3])
evals = list(pipeline.eval_dataset(paths, batch_size=4, image_size=32))  # default: ShardByJaxProcess
train = pipeline.train_examples(paths, seed=0, num_epochs=1, augment=pipeline.AugmentConfig(image_size=32))
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
batch = pipeline.to_global_batch(evals[0], mesh)
print(json.dumps({"eval": [i for b in evals for i in b["index"].tolist()], "train": [c for _, c in train],
                  "global": list(batch["images"].shape),
                  "local": [list(s.data.shape) for s in batch["images"].addressable_shards]}))
jax.distributed.shutdown()
"""


def test_two_real_jax_processes(shard_files, tmp_path):
    """jax.distributed on CPU: default sharding follows the process index; global arrays span both."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_DISTRIBUTED_WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), json.dumps(shard_files)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [r["eval"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, -1]]
    captions = _record_of_caption(shard_files)
    train = [[captions[c] for c in r["train"]] for r in results]
    # One shared shuffle dealt out alternately: disjoint, 3 each (drop_remainder), 6 of the 7 records,
    # and exactly the single-process order interleaved.
    single = [captions[c] for _, c in pipeline.train_examples(shard_files, seed=0, num_epochs=1, augment=AUG,
                                                               shard_options=grain.sharding.NoSharding())]
    assert train[0] == single[0:6:2] and train[1] == single[1:6:2]
    # 4 simulated devices per process: the global batch of 8 has one example per device.
    assert all(r["global"] == [8, 32, 32, 3] and r["local"] == [[1, 32, 32, 3]] * 4 for r in results)
