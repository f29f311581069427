"""Tests for rsclip_jax.checkpoint.torch_format (torch-free checkpoint I/O)."""

from __future__ import annotations

import builtins
import collections
import os
import pickle
import struct
import subprocess
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from rsclip_jax.checkpoint import torch_format as tf
from rsclip_jax.checkpoint.torch_format import (
    UnsafeCheckpointError,
    load_safetensors,
    load_state_dict,
    load_torch_state_dict,
    save_safetensors,
    save_state_dict,
    save_torch_state_dict,
)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_same(arr: np.ndarray, t: torch.Tensor) -> None:
    ref = to_numpy(t)
    assert arr.dtype == ref.dtype, (arr.dtype, ref.dtype)
    assert arr.shape == ref.shape, (arr.shape, ref.shape)
    # bitwise comparison (also covers NaN and bf16)
    np.testing.assert_array_equal(np.ascontiguousarray(arr).view(np.uint8),
                                  np.ascontiguousarray(ref).view(np.uint8))


def varied_state() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    shared = torch.arange(20, dtype=torch.float32)
    return collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        transposed=base.t(),  # non-contiguous view
        sliced=base[1:5:2, 2:],  # offset + strides
        shared_full=shared,  # same storage as the next two
        shared_view=shared[5:15].view(2, 5),
        shared_step=shared[::3],
        scalar_f=torch.tensor(2.5),
        scalar_i=torch.tensor(7, dtype=torch.int64),
        empty=torch.zeros(0, 3),
        empty_bf16=torch.zeros(0, dtype=torch.bfloat16),
        bf16=torch.randn(4, 3, generator=g).bfloat16(),
        f16=torch.randn(5, generator=g).half(),
        f64=torch.randn(2, 2, generator=g).double(),
        i64=torch.tensor([-(2**40), 0, 2**62], dtype=torch.int64),
        i32=torch.tensor([-5, 6], dtype=torch.int32),
        i16=torch.tensor([-300, 300], dtype=torch.int16),
        i8=torch.tensor([-5, 6], dtype=torch.int8),
        u8=torch.tensor([0, 255], dtype=torch.uint8),
        boolean=torch.tensor([[True, False], [False, True]]),
        param=torch.nn.Parameter(torch.ones(2, 2)),
        expanded=torch.ones(3).expand(4, 3),  # stride 0
    )


def small_model_state() -> collections.OrderedDict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 8), torch.nn.LayerNorm(8),
    )
    model(torch.randn(2, 3, 8, 8))  # update BN running stats / num_batches_tracked
    sd = model.state_dict()
    assert sd["1.num_batches_tracked"].dim() == 0
    return sd


# ----------------------------------------------------------------------------- torch -> numpy
def test_load_torch_save_varied(tmp_path):
    state = varied_state()
    path = tmp_path / "varied.pt"
    torch.save(state, path)
    loaded = load_torch_state_dict(path)
    assert list(loaded) == list(state)
    for k, t in state.items():
        assert_same(loaded[k], t)
    # returned arrays are writable and independent, even when storages were shared
    for arr in loaded.values():
        assert arr.flags.writeable and arr.flags.c_contiguous
    loaded["shared_full"][:] = -1
    assert_same(loaded["shared_view"], state["shared_view"])
    assert_same(loaded["shared_step"], state["shared_step"])


def test_small_model_round_trips(tmp_path):
    sd = small_model_state()
    torch.save(sd, tmp_path / "m.pth")
    loaded = load_torch_state_dict(tmp_path / "m.pth")
    assert loaded["1.num_batches_tracked"].dtype == np.int64
    assert loaded["1.num_batches_tracked"].shape == ()
    assert int(loaded["1.num_batches_tracked"]) == 1
    for k, t in sd.items():
        assert_same(loaded[k], t)
    save_torch_state_dict(loaded, tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back) == list(sd)
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k], t)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 8), torch.nn.LayerNorm(8),
    )
    model.load_state_dict(back, strict=True)


# ----------------------------------------------------------------------------- numpy -> torch
@pytest.mark.parametrize("mmap", [False, True])
def test_save_read_by_torch(tmp_path, mmap):
    state = varied_state()
    arrays = {k: to_numpy(t) for k, t in state.items()}
    arrays["fortran"] = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    arrays["reversed"] = np.arange(10, dtype=np.float64)[::-1]
    arrays["big_endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    path = tmp_path / "out.pt"
    save_torch_state_dict(arrays, path)
    back = torch.load(path, weights_only=True, mmap=mmap)
    assert isinstance(back, collections.OrderedDict)
    assert list(back) == list(arrays)
    for k, arr in arrays.items():
        t = back[k]
        assert t.device.type == "cpu"
        expected = arr.astype(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder == ">" else arr
        assert_same(expected, t)
    # and our own loader reads it back identically
    again = load_torch_state_dict(path)
    for k, arr in arrays.items():
        np.testing.assert_array_equal(again[k], arr)
        assert again[k].dtype == arr.dtype.newbyteorder("=")


def test_saved_layout_matches_torch(tmp_path):
    path = tmp_path / "layout.pt"
    save_torch_state_dict({"a": np.ones(3, np.float32), "b": np.zeros((2, 7), np.float16)}, path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names[0] == "layout/data.pkl"
        assert zf.read("layout/version") == b"3\n"
        assert zf.read("layout/byteorder") == b"little"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    raw = path.read_bytes()
    for info in infos:
        if "/data/" in info.filename:
            n, m = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
            assert (info.header_offset + 30 + n + m) % 64 == 0, info.filename
    assert not [p for p in os.listdir(tmp_path) if p != "layout.pt"]  # no temp files left


def test_save_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(TypeError, match="'z'"):
        save_torch_state_dict({"z": np.zeros(2, np.complex128)}, tmp_path / "c.pt")
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- containers
def test_container_unwrap_and_module_prefix(tmp_path):
    t = torch.arange(4.0)
    torch.save({"epoch": 3, "state_dict": {"module.x": t}}, tmp_path / "a.pt")
    out = load_torch_state_dict(tmp_path / "a.pt")
    assert list(out) == ["x"]
    np.testing.assert_array_equal(out["x"], t.numpy())


def test_open_clip_style_training_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ddp_sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    ckpt = {"epoch": 5, "name": "run", "state_dict": ddp_sd, "optimizer": opt.state_dict(),
            "extra": [1, 2.0, None, (True, "s"), b"bytes", {3, 4}]}
    torch.save(ckpt, tmp_path / "epoch_5.pt")
    out = load_torch_state_dict(tmp_path / "epoch_5.pt")
    assert sorted(out) == ["bias", "weight"]
    assert_same(out["weight"], model.weight)


def test_non_mapping_top_level(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "l.pt")
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_torch_state_dict(tmp_path / "l.pt")


# ----------------------------------------------------------------------------- hostile files
class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def write_torch_zip(path, pkl: bytes, extra: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        for name, data in (extra or {}).items():
            zf.writestr(f"archive/{name}", data)
        zf.writestr("archive/version", b"3\n")


def test_hostile_payload_is_live_without_protection(tmp_path):
    """Control: the payload really runs under a normal unpickler."""
    target = tmp_path / "pwned"
    write_torch_zip(tmp_path / "evil.pt", pickle.dumps(_Evil(builtins.open, (str(target), "w")), 2))
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert target.exists()


@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda p: _Evil(os.system, (f"touch {p}",)), "system"),
        (lambda p: _Evil(builtins.open, (str(p), "w")), "open"),  # pickled as io.open
        (lambda p: _Evil(builtins.eval, (f"open({str(p)!r}, 'w')",)), "builtins.eval"),
        (lambda p: _Evil(subprocess.call, (["touch", str(p)],)), "subprocess.call"),
    ],
)
def test_hostile_top_level_refused(tmp_path, make, refused):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    write_torch_zip(path, pickle.dumps(make(target), protocol=2))
    with pytest.raises(UnsafeCheckpointError) as exc:
        load_torch_state_dict(path)
    msg = str(exc.value)
    assert refused in msg and str(path) in msg and "safetensors" in msg
    assert not target.exists()


@pytest.mark.parametrize("opcodes", ["INST", "STACK_GLOBAL"])
def test_hostile_other_opcodes_refused(tmp_path, opcodes):
    target = tmp_path / "pwned"
    if opcodes == "INST":  # protocol-0 INST: "(<args> i<module>\n<name>\n"
        pkl = b"(V" + str(target).encode() + b"\nVw\nibuiltins\nopen\n."
    else:  # protocol 4: module/name pushed as strings, then STACK_GLOBAL
        pkl = pickle.dumps(_Evil(builtins.open, (str(target), "w")), protocol=4)
        assert b"\x93" in pkl
    path = tmp_path / "evil.pt"
    write_torch_zip(path, pkl)
    with pytest.raises(UnsafeCheckpointError, match="open"):
        load_torch_state_dict(path)
    assert not target.exists()


def test_hostile_nested_in_state_dict_refused(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "nested.pt"
    state = collections.OrderedDict(w=torch.ones(2), evil=_Evil(builtins.open, (str(target), "w")))
    torch.save({"state_dict": state, "epoch": 1}, path)
    with pytest.raises(UnsafeCheckpointError, match="'io.open'"):
        load_torch_state_dict(path)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(path)
    assert not target.exists()


def test_crafted_out_of_bounds_view_rejected(tmp_path):
    pkl = b"".join([
        b"\x80\x02", tf._p_global("collections", "OrderedDict"), b")R", tf._p_str("x"),
        tf._p_global("torch._utils", "_rebuild_tensor_v2"), b"((", tf._p_str("storage"),
        tf._p_global("torch", "FloatStorage"), tf._p_str("0"), tf._p_str("cpu"), tf._p_int(4),
        b"tQ", tf._p_int(2), tf._p_tuple((1000,)), tf._p_tuple((1,)), b"\x89",
        tf._p_global("collections", "OrderedDict"), b")RtRs.",
    ])
    path = tmp_path / "oob.pt"
    write_torch_zip(path, pkl, {"data/0": np.arange(4, dtype=np.float32).tobytes()})
    with pytest.raises(ValueError, match="exceeds its storage"):
        load_torch_state_dict(path)


# ----------------------------------------------------------------------------- bad files
def test_truncated_zip(tmp_path):
    torch.save(varied_state(), tmp_path / "full.pt")
    raw = (tmp_path / "full.pt").read_bytes()
    path = tmp_path / "trunc.pt"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.pt") as exc:
        load_torch_state_dict(path)
    assert "corrupt or truncated" in str(exc.value)


def test_corrupted_storage_bytes(tmp_path):
    path = tmp_path / "crc.pt"
    torch.save({"x": torch.arange(64, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("crc/data/0")
    raw = bytearray(path.read_bytes())
    n, m = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    raw[info.header_offset + 30 + n + m + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="crc.pt"):
        load_torch_state_dict(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello, this is not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt.*not a PyTorch zip checkpoint"):
        load_torch_state_dict(path)
    other = tmp_path / "other.pt"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(ValueError, match="no data.pkl"):
        load_torch_state_dict(other)


def test_legacy_format(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"x": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy"):
        load_torch_state_dict(path)


def test_torchscript_like_archive(tmp_path):
    path = tmp_path / "fake_jit.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/data.pkl", pickle.dumps({}, 2))
        zf.writestr("model/constants.pkl", pickle.dumps((), 2))
        zf.writestr("model/code/__torch__.py", "")
    with pytest.raises(ValueError, match="TorchScript") as exc:
        load_torch_state_dict(path)
    assert "state_dict" in str(exc.value) and "fake_jit.pt" in str(exc.value)

    real = tmp_path / "real_jit.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(real))
    with pytest.raises(ValueError, match="TorchScript"):
        load_torch_state_dict(real)


# ----------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip_and_interop(tmp_path):
    from safetensors.torch import load_file, save_file

    state = {k: to_numpy(t) for k, t in varied_state().items()}
    state["transposed_np"] = np.arange(12, dtype=np.float32).reshape(3, 4).T
    path = tmp_path / "m.safetensors"
    save_safetensors(state, path)
    back = load_safetensors(path)
    assert set(back) == set(state)
    for k, arr in state.items():
        assert back[k].dtype == arr.dtype and back[k].shape == arr.shape
        np.testing.assert_array_equal(back[k], arr)
    tensors = load_file(path)
    for k, arr in state.items():
        assert_same(arr, tensors[k])
    # and the reverse direction
    src = {k: v.detach().clone().contiguous() for k, v in varied_state().items()}
    save_file(src | {"bf": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "t.safetensors")
    from_torch = load_state_dict(tmp_path / "t.safetensors")
    assert from_torch["bf"].dtype == ml_dtypes.bfloat16
    assert_same(from_torch["sliced"], varied_state()["sliced"])


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_safetensors(path)


# ----------------------------------------------------------------------------- dispatch
def test_dispatch(tmp_path):
    state = {"a": np.arange(3, dtype=np.float32), "b": np.array(1, np.int64)}
    for name in ("x.safetensors", "x.pt", "x.pth", "x.bin"):
        save_state_dict(state, tmp_path / name)
        out = load_state_dict(tmp_path / name)
        assert set(out) == set(state)
        for k in state:
            np.testing.assert_array_equal(out[k], state[k])
            assert out[k].shape == state[k].shape
    os.rename(tmp_path / "x.pt", tmp_path / "weights.ckpt_unknown")
    assert set(load_state_dict(tmp_path / "weights.ckpt_unknown")) == set(state)
    os.rename(tmp_path / "x.safetensors", tmp_path / "weights.st")
    assert set(load_state_dict(tmp_path / "weights.st")) == set(state)
    garbage = tmp_path / "weights.dat"
    garbage.write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="weights.dat.*safetensors.*pt"):
        load_state_dict(garbage)
    with pytest.raises(ValueError, match="unknown suffix"):
        save_state_dict(state, tmp_path / "x.npz")


def test_failed_save_leaves_nothing_behind(tmp_path):
    (tmp_path / "keep.safetensors").write_bytes(b"old")
    with pytest.raises(Exception):
        save_safetensors({"o": np.array([object()], dtype=object)}, tmp_path / "keep.safetensors")
    assert os.listdir(tmp_path) == ["keep.safetensors"]
    assert (tmp_path / "keep.safetensors").read_bytes() == b"old"  # old file untouched
    save_safetensors({"a": np.zeros(2, np.float32)}, tmp_path / "keep.safetensors")
    assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_loading_does_not_import_torch(tmp_path):
    import sys

    torch.save({"x": torch.ones(3)}, tmp_path / "x.pt")
    code = ("import sys; from rsclip_jax.checkpoint.torch_format import load_state_dict, "
            f"save_state_dict; d = load_state_dict({str(tmp_path / 'x.pt')!r}); "
            f"save_state_dict(d, {str(tmp_path / 'y.pt')!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True)["x"], torch.ones(3))
