"""Read and write PyTorch ``torch.save`` checkpoints and safetensors files with numpy only.

Safety model
------------
A ``torch.save`` file is a zip archive holding ``<archive>/data.pkl`` (a pickle) plus one raw
record per tensor storage (``<archive>/data/<key>``).  Unpickling an arbitrary pickle can run
arbitrary code, because every callable a pickle invokes is first resolved by
``Unpickler.find_class``.  :class:`_RestrictedUnpickler` resolves only a short allow-list of
names (``collections.OrderedDict``, the ``torch._utils._rebuild_*`` tensor builders, the
``torch.*Storage`` types and a few inert builtins), and maps each one to a numpy/plain-Python
stand-in defined here; torch itself is never imported.  Any other global (``os.system``,
``builtins.eval``, ``subprocess.Popen`` ...) raises :class:`UnsafeCheckpointError` while the
opcode that names it is parsed, i.e. before anything it could call is invoked.  Tensor
rebuilds are bounds-checked against their storage so a crafted size/stride cannot read outside
the record.  Non-tensor values (epoch numbers, optimizer hyper-parameters) are built from plain
pickle literals and then dropped; only ``np.ndarray`` values are returned.

bfloat16 tensors are returned as ``ml_dtypes.bfloat16`` arrays (ml_dtypes ships with jax); if
ml_dtypes is unavailable they are upcast to float32 on load.
"""

from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import re
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import safetensors
from safetensors.numpy import load_file, save_file

from rsclip_jax.fileio import atomic_write

try:
    import ml_dtypes

    _BF16: Any = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes ships with jax
    _BF16 = None

__all__ = [
    "UnsafeCheckpointError", "load_torch_state_dict", "save_torch_state_dict",
    "load_safetensors", "load_safetensors_metadata", "save_safetensors", "is_safetensors", "load_state_dict", "save_state_dict",
]

_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# A torch file's architecture record lives beside it in `<file>.json` (see checkpoint/architecture.py).
SIDECAR_SUFFIX = ".json"


def sidecar_path(path: str | os.PathLike) -> Path:
    """`model.pt` -> `model.pt.json`, the sidecar that records a torch file's architecture."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)
_CHUNK = 1 << 24


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle references a global that is not on the tensor allow-list."""


class _StorageType(NamedTuple):  # immutable: a pickle BUILD opcode cannot tamper with it
    name: str


class _Storage(NamedTuple):
    key: str
    array: np.ndarray  # 1-D, typed, native byte order


def _storage_dtype(name: str) -> np.dtype:
    dt = _STORAGE_DTYPES[name]
    if dt == "bfloat16":
        return _BF16 if _BF16 is not None else np.dtype(np.uint16)
    return np.dtype(dt)


def _latin1_encode(obj: Any, encoding: str = "utf-8") -> bytes:  # protocol-2 `bytes` values
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return obj.encode("latin1")


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _is_int_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and all(type(v) is int and v >= 0 for v in x)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals to numpy stand-ins."""

    def __init__(self, data: Any, zf: zipfile.ZipFile, prefix: str, big_endian: bool, path: str):
        super().__init__(data)
        self._zf, self._prefix, self._big, self._path = zf, prefix, big_endian, path
        self._storages: dict[str, _Storage] = {}
        self._handed_out: set[str] = set()
        rebuild_param: Callable[..., Any] = lambda data, *_: data
        self._allowed: dict[str, Any] = {
            "collections.OrderedDict": collections.OrderedDict,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor,
            "torch._utils._rebuild_parameter": rebuild_param,
            "torch._utils._rebuild_parameter_with_state": rebuild_param,
            "torch.Size": tuple,
            "torch.device": lambda *args: ":".join(str(a) for a in args),
            "builtins.set": set, "builtins.frozenset": frozenset, "_codecs.encode": _latin1_encode,
        }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 (python 2) spellings
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qual = f"{module}.{name}"
        if qual in self._allowed:
            return self._allowed[qual]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"refusing to load {self._path}: its pickle references {qual!r}, which is not a "
            "tensor type; only state_dicts of tensors can be loaded. If you trust the file, "
            "re-save it with `torch.save(model.state_dict())` or convert it to .safetensors")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise ValueError(f"{self._path}: unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise ValueError(f"{self._path}: malformed storage reference {pid!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(key, self._read_storage(key, stype, numel))
        return self._storages[key]

    def _read_storage(self, key: str, stype: _StorageType, numel: int) -> np.ndarray:
        dtype = _storage_dtype(stype.name)
        name = f"{self._prefix}data/{key}"
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            raise ValueError(f"{self._path}: storage record {name!r} is missing") from None
        nbytes = numel * dtype.itemsize
        if numel < 0 or info.file_size < nbytes:
            raise ValueError(f"{self._path}: storage {name!r} has {info.file_size} bytes, "
                             f"expected {nbytes} (truncated or corrupt)")
        buf = bytearray(nbytes)
        view, pos = memoryview(buf), 0
        with self._zf.open(info) as f:  # chunked: no second full-size copy
            while pos < nbytes:
                chunk = f.read(min(_CHUNK, nbytes - pos))
                if not chunk:
                    raise ValueError(f"{self._path}: storage {name!r} is truncated")
                view[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
        if self._big and dtype.itemsize > 1:
            np.frombuffer(buf, dtype=f"u{dtype.itemsize}").byteswap(inplace=True)
        arr = np.frombuffer(buf, dtype=dtype)
        if stype.name == "BFloat16Storage" and _BF16 is None:  # pragma: no cover
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> np.ndarray:
        if not (isinstance(storage, _Storage) and type(offset) is int and offset >= 0
                and _is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride)):
            raise ValueError(f"{self._path}: malformed tensor record")
        flat = storage.array
        count = int(np.prod(size, dtype=np.int64)) if size else 1
        if count == 0:
            return np.zeros(size, dtype=flat.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise ValueError(f"{self._path}: tensor view exceeds its storage {storage.key!r}")
        contiguous = all(s == c for n, s, c in zip(size, stride, _contiguous_strides(size)) if n != 1)
        if offset == 0 and count == flat.size and contiguous and storage.key not in self._handed_out:
            self._handed_out.add(storage.key)  # whole storage: hand it out without copying
            return flat.reshape(size)
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False)
        return np.array(view, copy=True, order="C")


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
    for _ in range(3):  # {'state_dict': ...}, {'model': ...}, {'module': ...}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in ("state_dict", "model", "module")
                      if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict (mapping of names to tensors), "
                         f"got {type(obj).__name__}")
    out = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if out and all(k.startswith("module.") for k in out):  # DistributedDataParallel prefix
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a ``torch.save`` zip checkpoint (``.pt/.pth/.bin``) as numpy arrays, without torch.

    Container dicts (``{'state_dict': ...}``, ``{'model': ...}``) are unwrapped and a DDP
    ``module.`` prefix is stripped.  Raises :class:`UnsafeCheckpointError` if the pickle names
    any global outside the tensor allow-list, and ``ValueError`` for legacy/TorchScript/corrupt
    files.
    """
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK\x03\x04"):
        if head[:1] == b"\x80":
            raise ValueError(
                f"{path} uses the legacy (pre-1.6, non-zip) torch serialization format, which "
                "cannot be read without torch; re-save it with torch >= 1.6: "
                "`torch.save(torch.load(path, weights_only=True), new_path)`")
        raise ValueError(f"{path} is not a PyTorch zip checkpoint (no zip header)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                raise ValueError(
                    f"{path} is a TorchScript archive (e.g. OpenAI's original CLIP .pt), not a "
                    "state_dict; load it with open_clip (`open_clip.create_model(name, "
                    "pretrained=path)`) and save `model.state_dict()` with torch.save or "
                    "safetensors")
            pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if not pkls:
                raise ValueError(f"{path} is a zip archive but not a torch checkpoint (no data.pkl)")
            prefix = pkls[0][: -len("data.pkl")]
            big = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
            with zf.open(pkls[0]) as pf:
                obj = _RestrictedUnpickler(pf, zf, prefix, big, path).load()
    except ValueError as e:
        if path in str(e):
            raise
        raise ValueError(f"could not read {path}: {e}") from e
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, struct.error, KeyError,
            TypeError, IndexError, AttributeError, OverflowError, NotImplementedError) as e:
        raise ValueError(f"could not read {path}: corrupt or truncated torch checkpoint "
                         f"({type(e).__name__}: {e})") from e
    return _unwrap(obj, path)


# --------------------------------------------------------------------------- writing
def _p_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _p_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    enc = pickle.encode_long(n)
    return b"\x8a" + bytes([len(enc)]) + enc


def _p_tuple(items: tuple[int, ...]) -> bytes:
    return (b"(" + b"".join(_p_int(i) for i in items) + b"t") if items else b")"


def _p_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode("ascii")


def _storage_name(dtype: np.dtype) -> str:
    if _BF16 is not None and dtype == _BF16:
        return "BFloat16Storage"
    for name, dt in _STORAGE_DTYPES.items():
        if name != "UntypedStorage" and dt != "bfloat16" and np.dtype(dt) == dtype.newbyteorder("="):
            return name
    raise TypeError(f"unsupported dtype {dtype} for a torch checkpoint")


def _c_contiguous(arr: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays into shape (1,)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def save_torch_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``state`` as a torch zip checkpoint readable by ``torch.load(path, weights_only=True)``.

    The pickle (protocol 2, written opcode by opcode) is an ``OrderedDict`` of CPU tensors; torch
    is not imported.  Storage records are uncompressed and 64-byte aligned like torch's own.
    """
    arrays, pkl = [], [b"\x80\x02", _p_global("collections", "OrderedDict"), b")R"]
    for i, (key, value) in enumerate(state.items()):
        arr = np.asarray(value)
        try:
            storage = _storage_name(arr.dtype)
        except TypeError as e:
            raise TypeError(f"{key!r}: {e}") from None
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
            arr = arr.astype(arr.dtype.newbyteorder("<"))  # torch records are little-endian
        arr = _c_contiguous(arr)
        arrays.append(arr)
        pkl += [_p_str(str(key)), _p_global("torch._utils", "_rebuild_tensor_v2"), b"((",
                _p_str("storage"), _p_global("torch", storage), _p_str(str(i)), _p_str("cpu"),
                _p_int(arr.size), b"tQ", _p_int(0), _p_tuple(arr.shape),
                _p_tuple(_contiguous_strides(arr.shape)), b"\x89",
                _p_global("collections", "OrderedDict"), b")RtRs"]
    pkl.append(b".")
    archive = re.sub(r"[^A-Za-z0-9_]", "_", Path(path).stem) or "archive"

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            def record(name: str, data: Any, align: bool = False) -> None:
                info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
                info.file_size = len(data)
                zip64 = len(data) * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule
                if align:  # pad the local header's extra field like torch does (id 'FB')
                    start = f.tell() + 30 + len(info.filename) + 4 + (20 if zip64 else 0)
                    pad = -start % 64
                    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
                with zf.open(info, "w", force_zip64=zip64) as dest:
                    dest.write(data)

            record("data.pkl", b"".join(pkl))
            record("byteorder", b"little")
            for i, arr in enumerate(arrays):  # uint8 view: len(memoryview) == nbytes, no copy
                record(f"data/{i}", memoryview(arr.reshape(-1).view(np.uint8)), align=True)
            record("version", b"3\n")

    atomic_write(path, write)


# --------------------------------------------------------------------------- safetensors
def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a ``.safetensors`` file as numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``)."""
    try:
        return dict(load_file(str(path)))
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError derives from Exception only
        raise ValueError(f"could not read {path}: corrupt or invalid safetensors file "
                         f"({type(e).__name__}: {e})") from e


def load_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's ``__metadata__`` (string to string; empty when the file has none)."""
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"could not read {path}: corrupt or invalid safetensors file "
                         f"({type(e).__name__}: {e})") from e


def save_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write ``state`` as a ``.safetensors`` file (contiguous copies where needed).

    ``metadata`` goes into the header's ``__metadata__`` (string keys and values).
    """
    tensors = {str(k): _c_contiguous(np.asarray(v)) for k, v in state.items()}
    meta = dict(metadata) if metadata else None
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# --------------------------------------------------------------------------- dispatch
def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a state dict from ``.safetensors`` or a torch zip checkpoint (``.pt/.pth/.bin``)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path)
    if suffix in _TORCH_SUFFIXES:
        return load_torch_state_dict(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return load_torch_state_dict(path)
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header size, then JSON
        return load_safetensors(path)
    raise ValueError(f"{path}: unrecognised checkpoint format; supported formats are "
                     ".safetensors and torch.save zip checkpoints (.pt/.pth/.bin)")


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (by suffix, else by its first bytes) a safetensors file."""
    suffix = Path(path).suffix.lower()
    if suffix in (".safetensors", *_TORCH_SUFFIXES):
        return suffix == ".safetensors"
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) >= 9 and head[8:9] == b"{"  # u64 header size, then JSON


def save_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Save ``state`` as ``.safetensors`` or a torch checkpoint (``.pt/.pth/.bin``) by suffix.

    ``metadata`` is stored in a safetensors header only (torch files have no place for it).
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        save_safetensors(state, path, metadata)
    elif suffix in _TORCH_SUFFIXES:
        save_torch_state_dict(state, path)
        # An old sidecar describes the weights just replaced; the caller writes a new one if it can.
        sidecar_path(path).unlink(missing_ok=True)
    else:
        raise ValueError(f"{path}: unknown suffix {suffix!r}; use .safetensors, .pt, .pth or .bin")
