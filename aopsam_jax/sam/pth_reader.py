"""Read PyTorch `.pth` / `.bin` state dicts without torch, safely.

A `torch.save` file is a zip archive holding ``<prefix>/data.pkl`` (a pickle
of the object tree) and one raw little-endian buffer per storage,
``<prefix>/data/<key>``; files written with
``_use_new_zipfile_serialization=False`` (torch < 1.6) are instead a series
of pickles followed by the raw storages.  Both are read here with a
restricted unpickler whose `find_class` knows exactly the globals a state
dict needs (the tensor / parameter rebuild functions, the storage types and
`collections.OrderedDict`) and maps them to local numpy stand-ins; any other
global is refused before it is even looked up, so nothing from the file can
execute and torch is never imported.

    sd = read_pth("sam_vit_h_4b8939.pth")    # {name: numpy array}

Tensors come back as read-only numpy arrays of the stored dtype (bfloat16 as
`ml_dtypes.bfloat16`), strides and storage offsets honoured: each is a view
of its storage's bytes, so a tensor saved as an expanded (stride-0) view
costs no more memory than its storage.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, Callable, Dict, Optional

import ml_dtypes
import numpy as np


class PthError(ValueError):
  """A file that is not a readable torch.save state dict; the message says why."""


class RefusedGlobal(PthError):
  """The pickle references a global outside the state-dict allowlist."""

  def __init__(self, module: str, name: str):
    super().__init__(f"{module}.{name}")
    self.module, self.name = module, name


# storage class name (as pickled: GLOBAL 'torch <name>') -> numpy dtype
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "DoubleStorage": np.dtype("<f8"),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
  """Stand-in for `torch.FloatStorage` & co: only carries the dtype."""

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """numpy twin of `torch._utils._rebuild_tensor_v2`."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise PthError("a tensor's storage is not a storage reference")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride):
    raise PthError(f"tensor size {size} and stride {stride} disagree")
  n = storage.size
  last = int(storage_offset) + sum((s - 1) * st for s, st in zip(size, stride) if s > 0)
  if any(s < 0 for s in size) or any(st < 0 for st in stride) or \
     (0 not in size and (storage_offset < 0 or last >= n)):
    raise PthError(f"tensor of size {size}, stride {stride}, offset {storage_offset} does not "
                   f"fit its storage of {n} elements")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  isz = storage.dtype.itemsize
  # a read-only view: legacy files fill their storages after the object pickle
  return np.lib.stride_tricks.as_strided(storage[int(storage_offset):], size,
                                         tuple(st * isz for st in stride), writeable=False)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_SAFE_GLOBALS: Dict[tuple, Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
  """Allowlist unpickler; `load_storage(type, key, numel)` supplies raw storages."""

  def __init__(self, f, load_storage: Callable[[_StorageType, str, int], np.ndarray]):
    super().__init__(f)
    self._load_storage = load_storage
    self._storages: Dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    try:
      return _SAFE_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      # name it as Python 3 does (protocol-2 pickles say __builtin__)
      module = {"__builtin__": "builtins"}.get(module, module)
      raise RefusedGlobal(str(module), str(name)) from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise PthError(f"unsupported persistent id {str(pid)[:80]}")
    stype, key, numel = pid[1], str(pid[2]), pid[4]
    if len(pid) > 5 and pid[5] is not None:
      raise PthError("storage views (torch < 0.4 files) are not supported")
    if key not in self._storages:
      self._storages[key] = self._load_storage(stype, key, int(numel))
    return self._storages[key]


def _load_zip(path: str, zf: zipfile.ZipFile) -> Any:
  names = zf.namelist()
  pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if not pkl:
    raise PthError("a zip archive but not a torch.save file (no <name>/data.pkl)")
  prefix = pkl[0][:-len("data.pkl")]
  if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() != b"little":
    raise PthError("big-endian torch.save files are not supported")

  def load_storage(stype: _StorageType, key: str, numel: int) -> np.ndarray:
    try:
      raw = zf.read(f"{prefix}data/{key}")
    except KeyError:
      raise PthError(f"storage {key} is missing from the archive") from None
    need = numel * stype.dtype.itemsize
    if len(raw) < need:
      raise PthError(f"storage {key} holds {len(raw)} bytes, {need} expected")
    return np.frombuffer(raw, stype.dtype, count=numel)

  return _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _load_legacy(f) -> Any:
  """torch < 1.6 format: magic, protocol, sys_info, object pickle, storage keys, raw storages."""
  def nxt():
    return _Unpickler(f, lambda *a: None).load()

  if nxt() != _LEGACY_MAGIC:
    raise PthError("a pickle, but not a torch.save file (no torch magic number)")
  if nxt() != _LEGACY_PROTOCOL:
    raise PthError("unsupported legacy torch.save protocol version")
  nxt()  # sys_info: {protocol_version, little_endian, type_sizes}
  wanted: Dict[str, tuple] = {}

  def record(stype, key, numel):
    buf = np.empty(numel, stype.dtype)
    wanted[key] = (stype, buf)
    return buf

  obj = _Unpickler(f, record).load()
  keys = _Unpickler(f, lambda *a: None).load()
  if not isinstance(keys, list):
    raise PthError("corrupt legacy file (storage key list)")
  for key in keys:
    if key not in wanted:
      raise PthError(f"corrupt legacy file (unknown storage {key!r})")
    stype, buf = wanted[key]
    head = f.read(8)
    if len(head) < 8:
      raise EOFError("the file ends inside the storages")
    (numel,) = struct.unpack("<q", head)
    if numel != buf.size:
      raise PthError(f"storage {key}: {numel} elements on disk, {buf.size} expected")
    raw = f.read(numel * stype.dtype.itemsize)
    if len(raw) < numel * stype.dtype.itemsize:
      raise EOFError("the file ends inside the storages")
    buf[...] = np.frombuffer(raw, stype.dtype)
  return obj


def load_pth(path: str) -> Any:
  """The object tree of a torch.save file with numpy arrays for tensors.

  Raises `RefusedGlobal` for a pickle that references anything else, `PthError`
  for a file that is not a torch.save file, and EOFError / zipfile.BadZipFile
  / pickle.UnpicklingError for truncated or corrupt ones.
  """
  with open(path, "rb") as f:
    if f.read(4) == b"PK\x03\x04":
      f.seek(0)
      with zipfile.ZipFile(f) as zf:
        return _load_zip(path, zf)
    f.seek(0)
    return _load_legacy(f)


def state_dict_from(obj: Any, where: str) -> Dict[str, np.ndarray]:
  """A state dict (or a training checkpoint wrapping one) -> {str: ndarray}."""
  if isinstance(obj, dict):
    for wrapper in ("model", "state_dict", "model_state_dict", "module"):
      inner = obj.get(wrapper)
      if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
        obj = inner
        break
  if not isinstance(obj, dict) or not obj:
    what = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise PthError(f"{where}: the file holds {what}, not a model state dict")
  for k, v in obj.items():
    if not isinstance(k, str):
      raise PthError(f"{where}: state dict keys must be strings (found {k!r}); the file is a "
                     "pickle but not a model state dict")
    if not isinstance(v, np.ndarray):
      raise PthError(f"{where}: entry {k!r} has type {type(v).__name__}, not a tensor; the "
                     "file is a pickle but not a model state dict")
  return dict(obj)


def read_pth(path: str, where: Optional[str] = None) -> Dict[str, np.ndarray]:
  return state_dict_from(load_pth(path), where or path)
