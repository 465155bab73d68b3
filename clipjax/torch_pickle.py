"""Restricted, torch-free reader for files written by ``torch.save``.

``pickle`` executes whatever callables a file names, so loading an untrusted checkpoint with
plain ``pickle``/``torch.load(weights_only=False)`` can run arbitrary code. This module reads
checkpoints into numpy without importing torch, through an unpickler whose ``find_class``
resolves only an allow-list of names to *our own* inert implementations:

* tensor rebuild functions (``torch._utils._rebuild_tensor_v2`` and friends) -> ``np.ndarray``;
* storage types (``torch.FloatStorage`` ...) -> a dtype tag; the bytes come from the archive;
* ``collections.OrderedDict``, ``set``/``frozenset``, ``torch.device``/``torch.Size``/dtypes;
* only with ``allow_modules=True``: the class names of pickled ``nn.Module`` objects that we
  know (OpenAI's ``dall_e`` Encoder/Decoder and the ``torch.nn`` containers/layers they use).
  Each becomes an inert :class:`TorchModule` placeholder holding the pickled ``__dict__``;
  nothing is ever imported by name, so no code from the named module can run.

Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) raises
:class:`UnsafePickleError`, which names the global and how to opt in.

TorchScript archives (``torch.jit.save``, e.g. OpenAI's CLIP ``.pt`` files) are read the same
way with ``allow_modules=True``: their ``__torch__.*`` classes become placeholders, ``data.pkl``
yields the attribute tree and ``code/`` is never looked at.

Formats: the zip format of torch >= 1.6 (``<archive>/data.pkl`` + ``<archive>/data/<key>``
storages + ``<archive>/byteorder``) and the legacy stream format
(``torch.save(..., _use_new_zipfile_serialization=False)``). Storages of dtype float16/32/64,
bfloat16 (as ``ml_dtypes.bfloat16``), int8/16/32/64, uint8 and bool; tensors honour storage
offsets and strides (views, transposes) and are returned as owned, C-contiguous copies.

Typical use::

    sd = load_torch_file("model.pt")                         # state dict -> {name: ndarray}
    enc = load_torch_file("encoder.pkl", allow_modules=True)  # pickled nn.Module -> TorchModule
    sd = state_dict(enc)                                      # {"blocks.input.w": ndarray, ...}
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

__all__ = [
    "UnsafePickleError",
    "TorchModule",
    "TorchDevice",
    "load_torch_file",
    "load_state_dict",
    "state_dict",
    "KNOWN_MODULE_CLASSES",
]


class UnsafePickleError(pickle.UnpicklingError):
    """The file references a global that the restricted unpickler refuses to resolve."""


# --------------------------------------------------------------------------- dtypes

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
}


class _StorageType:
    """Placeholder for ``torch.<X>Storage``: only carries the element dtype."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


class TorchDtype:
    """Placeholder for a pickled ``torch.dtype`` (e.g. a module attribute)."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.numpy_dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


class TorchDevice(str):
    """Placeholder for a pickled ``torch.device``; it is just the device string."""

    def __new__(cls, kind: Any = "cpu", index: Any = None):
        text = str(kind) if index is None else f"{kind}:{int(index)}"
        return super().__new__(cls, text)


class _Storage:
    """A typed 1-D storage: ``array`` is a read-only numpy view of the archive bytes."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


# --------------------------------------------------------------------------- modules

# Class names of pickled nn.Modules that may be reconstructed as inert placeholders. These
# are exactly the classes found in OpenAI's dall_e encoder.pkl / decoder.pkl plus the common
# torch.nn layers such files contain; extend per call with ``extra_module_classes``.
KNOWN_MODULE_CLASSES: frozenset[str] = frozenset({
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder", "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.ModuleDict", "torch.nn.modules.container.ParameterList",
    "torch.nn.modules.container.ParameterDict",
    "torch.nn.modules.activation.ReLU", "torch.nn.modules.activation.GELU",
    "torch.nn.modules.activation.SiLU", "torch.nn.modules.activation.Sigmoid",
    "torch.nn.modules.activation.Tanh",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.upsampling.Upsample", "torch.nn.modules.upsampling.UpsamplingNearest2d",
    "torch.nn.modules.linear.Identity", "torch.nn.modules.linear.Linear",
    "torch.nn.modules.flatten.Flatten",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.normalization.LayerNorm", "torch.nn.modules.normalization.GroupNorm",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.sparse.Embedding",
})


class TorchModule:
    """Inert stand-in for a pickled ``torch.nn.Module``.

    It holds the pickled instance ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``
    and plain attributes such as ``n_hid``) and has no behaviour: it cannot be called.
    ``torch_class`` is the dotted name of the class the file referenced.
    """

    torch_class: str = "torch.nn.Module"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict) and self.is_torchscript:
            state = {"_state": state}  # a TorchScript __setstate__ payload; kept as data
        if not isinstance(state, dict):
            raise UnsafePickleError(
                f"unexpected pickled state of type {type(state).__name__} for module "
                f"{self.torch_class}; expected a dict")
        self.__dict__.update(state)

    def __repr__(self):
        children = ", ".join(name for name, _ in self._children())
        return f"TorchModule({self.torch_class}{'; ' + children if children else ''})"

    @property
    def is_torchscript(self) -> bool:
        """TorchScript modules pickle a flat attribute dict (no ``_parameters``/``_modules``)."""
        return self.torch_class.startswith("__torch__")

    def _children(self):
        if self.is_torchscript:
            return [(k, v) for k, v in self.__dict__.items() if isinstance(v, TorchModule)]
        return [(k, v) for k, v in (self.__dict__.get("_modules") or {}).items() if v is not None]

    def named_modules(self, prefix: str = ""):
        """Yields ``(dotted_name, module)`` for this module and all descendants (torch order)."""
        yield prefix, self
        for name, child in self._children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def state_dict(self) -> "collections.OrderedDict[str, np.ndarray]":
        """``{dotted_name: array}`` like ``nn.Module.state_dict()``: parameters, persistent
        buffers, then children, recursively. For TorchScript modules, every array attribute
        (parameters, buffers and plain tensor attributes) in attribute order."""
        out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        for prefix, module in self.named_modules():
            d = module.__dict__
            dot = f"{prefix}." if prefix else ""
            if module.is_torchscript:
                out.update((dot + k, v) for k, v in d.items() if isinstance(v, np.ndarray))
                continue
            for name, value in (d.get("_parameters") or {}).items():
                if value is not None:
                    out[dot + name] = value
            skip = d.get("_non_persistent_buffers_set") or set()
            for name, value in (d.get("_buffers") or {}).items():
                if value is not None and name not in skip:
                    out[dot + name] = value
        return out


_MODULE_STUBS: dict[str, type] = {}


def _module_stub(qualname: str) -> type:
    if qualname not in _MODULE_STUBS:
        short = qualname.rsplit(".", 1)[-1]
        _MODULE_STUBS[qualname] = type(short, (TorchModule,), {"torch_class": qualname,
                                                                "__module__": __name__})
    return _MODULE_STUBS[qualname]


class _TensorClass:
    """Placeholder for ``torch.Tensor`` / ``torch.nn.Parameter`` used as a *type argument*."""

    def __init__(self, name):
        self.name = name


# --------------------------------------------------------------------------- tensors

def _tensor_from_storage(storage, offset, size, stride) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(
            f"tensor rebuild got a {type(storage).__name__} instead of a storage reference")
    arr = storage.array
    try:
        offset = int(offset)
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError) as e:
        raise UnsafePickleError(f"malformed tensor metadata: {e}") from None
    if len(size) != len(stride):
        raise UnsafePickleError(f"tensor size {size} and stride {stride} differ in rank")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise UnsafePickleError(f"negative tensor offset/size/stride: {offset}, {size}, {stride}")
    if math.prod(size) == 0:
        return np.zeros(size, arr.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= arr.size:
        # Never let as_strided read outside the storage buffer.
        raise UnsafePickleError(
            f"tensor view (offset {offset}, size {size}, stride {stride}) reaches element "
            f"{last} of a storage of {arr.size} elements; the file is corrupt")
    view = np.lib.stride_tricks.as_strided(
        arr[offset:], shape=size, strides=tuple(s * arr.itemsize for s in stride),
        writeable=False)
    return np.array(view, copy=True, order="C")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_parameter, _rebuild_from_type_v2):
        raise UnsafePickleError(f"_rebuild_from_type_v2 called with disallowed function {func!r}")
    return func(*args)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store ``bytes`` as ``_codecs.encode(text, 'latin1')``.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is only allowed as pickle's bytes encoding")
    return obj.encode("latin1")


def _frozen_set(items=()):
    return frozenset(items)


_SAFE_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": _TensorClass("Tensor"),
    "torch.nn.parameter.Parameter": _TensorClass("Parameter"),
    "torch.device": TorchDevice,
    "torch.Size": tuple,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": _frozen_set,
    "_codecs.encode": _codecs_encode,
    # TorchScript pickles wrap typed containers in these; all are identity functions here.
    "torch.jit._pickle.restore_type_tag": lambda value, type_str: value,
    "torch.jit._pickle.build_intlist": list,
    "torch.jit._pickle.build_doublelist": list,
    "torch.jit._pickle.build_boollist": list,
    "torch.jit._pickle.build_tensorlist": list,
}
_SAFE_GLOBALS.update({f"torch.{k}": _StorageType(k, v) for k, v in _STORAGE_DTYPES.items()})
_SAFE_GLOBALS.update({f"torch.{k}": TorchDtype(k, v) for k, v in _TORCH_DTYPES.items()})

_COMPAT_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

_OPT_IN_HINT = (
    "If you trust this file, pass extra_globals={{'{q}': <a callable of your choosing>}} to "
    "load_torch_file (the name is never imported), or load it with "
    "torch.load(path, weights_only=False) in a separate process.")


class _RestrictedUnpickler(pickle.Unpickler):

    def __init__(self, file, *, storage, source: str, allow_modules: bool,
                 extra_globals: Mapping[str, Any], extra_module_classes):
        super().__init__(file, encoding="utf-8")
        self._storage = storage
        self._source = source
        self._allow_modules = allow_modules
        self._extra_globals = dict(extra_globals or {})
        self._module_classes = KNOWN_MODULE_CLASSES | frozenset(extra_module_classes or ())

    def find_class(self, module: str, name: str):
        module = _COMPAT_MODULES.get(module, module)
        qual = f"{module}.{name}"
        if qual in self._extra_globals:
            return self._extra_globals[qual]
        if qual in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[qual]
        if qual in self._module_classes or module == "__torch__" or module.startswith("__torch__."):
            if self._allow_modules:
                return _module_stub(qual)
            raise UnsafePickleError(
                f"{self._source} contains a pickled torch module ({qual}). To read its "
                "parameters without importing it, call load_torch_file(..., allow_modules=True); "
                "the class is replaced by an inert TorchModule placeholder.")
        raise UnsafePickleError(
            f"{self._source}: refusing to resolve global '{qual}' - it is not on the "
            "torch_pickle allow-list (tensor rebuild functions, storage types, OrderedDict, "
            "known module classes), and resolving it could execute code. "
            + _OPT_IN_HINT.format(q=qual))

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # Legacy format: ("module", class, source file, source text) for source-change
            # warnings; the class was already resolved (or refused) by find_class.
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._source}: unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if isinstance(storage_type, TorchDtype):  # newer torch may pass a dtype
            storage_type = _StorageType(storage_type.name, storage_type.numpy_dtype)
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self._source}: bad storage type {storage_type!r}")
        return self._storage(storage_type.dtype, str(key), int(numel), view)


# --------------------------------------------------------------------------- formats

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _to_native(arr: np.ndarray, byteorder: str) -> np.ndarray:
    if byteorder == "big" and arr.dtype.itemsize > 1:
        arr = arr.view(arr.dtype.newbyteorder(">")).astype(arr.dtype.newbyteorder("="))
    return arr


def _load_zip(path: str, zf: zipfile.ZipFile, opts) -> Any:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkls:
        raise ValueError(f"{path}: zip archive without '<archive>/data.pkl'; not a torch.save file")
    prefix = pkls[0][: -len("data.pkl")]
    if (any(n.startswith(prefix + "code/") for n in names) or prefix + "constants.pkl" in names) \
            and not opts["allow_modules"]:
        raise UnsafePickleError(
            f"{path} is a TorchScript archive (torch.jit.save) holding a scripted module. To read "
            "its parameters without torch, call load_torch_file(..., allow_modules=True): its "
            "__torch__.* classes become inert TorchModule placeholders and its code is never run.")
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = zf.read(prefix + "byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
    cache: dict[str, np.ndarray] = {}

    def storage(dtype, key, numel, view):
        if key not in cache:
            record = f"{prefix}data/{key}"
            try:
                raw = zf.read(record)
            except KeyError:
                raise ValueError(f"{path}: missing storage record {record}") from None
            if len(raw) < numel * dtype.itemsize:
                raise ValueError(f"{path}: storage {key} has {len(raw)} bytes, needs "
                                 f"{numel * dtype.itemsize} ({numel} x {dtype})")
            arr = np.frombuffer(raw, dtype=dtype, count=numel)
            cache[key] = _to_native(arr, byteorder)
        return _Storage(cache[key])

    with zf.open(pkls[0]) as f:
        return _RestrictedUnpickler(io.BytesIO(f.read()), storage=storage, source=path,
                                    **opts).load()


def _load_legacy(path: str, f, opts) -> Any:
    def no_storage(*args):
        raise UnsafePickleError(f"{path}: storage reference in a legacy header pickle")

    def header():
        return _RestrictedUnpickler(f, storage=no_storage, source=path, allow_modules=False,
                                    extra_globals={}, extra_module_classes=()).load()

    try:
        magic = header()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        if isinstance(e, UnsafePickleError):
            raise
        raise ValueError(f"{path} is neither a torch.save zip archive nor a legacy torch.save "
                         f"stream ({e})") from None
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{path}: not a torch.save file (bad legacy magic number)")
    protocol = header()
    sys_info = header()
    if protocol != 1001:
        raise ValueError(f"{path}: unsupported legacy torch.save protocol {protocol}")
    byteorder = "little" if sys_info.get("little_endian", True) else "big"
    start = f.tell()

    # Pass 1: learn each storage's dtype (the raw data follows the main pickle).
    dtypes: dict[str, np.dtype] = {}

    def record(dtype, key, numel, view):
        dtypes[key] = dtype
        return _Storage(np.zeros(numel, dtype))  # dry-run values; discarded

    _RestrictedUnpickler(f, storage=record, source=path, **opts).load()
    keys = header()
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", f.read(8))
        dtype = dtypes[str(key)]
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise ValueError(f"{path}: truncated data for storage {key}")
        arrays[str(key)] = _to_native(np.frombuffer(raw, dtype=dtype), byteorder)

    # Pass 2: the real load.
    def storage(dtype, key, numel, view):
        arr = arrays[key]
        if view is not None:  # (view_key, element offset, view size) from old torch
            _, off, n = view
            arr = arr[int(off):int(off) + int(n)]
        return _Storage(arr)

    end = f.tell()
    f.seek(start)
    obj = _RestrictedUnpickler(f, storage=storage, source=path, **opts).load()
    f.seek(end)
    return obj


def load_torch_file(path: str | os.PathLike, allow_modules: bool = False, *,
                    extra_globals: Mapping[str, Callable] | None = None,
                    extra_module_classes=()) -> Any:
    """Loads a ``torch.save`` file without torch and without executing code from the file.

    Args:
      path: a file written by ``torch.save`` (zip or legacy format).
      allow_modules: reconstruct pickled ``nn.Module`` objects of the classes in
        ``KNOWN_MODULE_CLASSES`` (+ ``extra_module_classes``) as inert :class:`TorchModule`
        placeholders. Off by default, so that a state-dict loader never builds objects.
      extra_globals: ``{"module.name": callable}`` - explicit opt-in for further globals; the
        callable you give is used in place of the named one (nothing is imported).
      extra_module_classes: further dotted class names to reconstruct as placeholders.

    Returns:
      The unpickled object with every tensor replaced by an owned ``np.ndarray`` (dicts and
      OrderedDicts, lists, tuples, scalars, strings, TorchModule placeholders).

    Raises:
      UnsafePickleError: the file references a global outside the allow-list.
      ValueError: the file is not a torch.save file (or is corrupt).
    """
    path = os.fspath(path)
    opts = dict(allow_modules=allow_modules, extra_globals=extra_globals or {},
                extra_module_classes=extra_module_classes)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return _load_zip(path, zf, opts)
    with open(path, "rb") as f:
        return _load_legacy(path, f, opts)


def state_dict(obj: Any) -> "collections.OrderedDict[str, np.ndarray]":
    """Flat ``{dotted_name: array}`` from a :class:`TorchModule` or a (nested) dict of arrays.

    Nested dicts (e.g. ``{"model": {...}}``) are flattened with dots, matching torch names.
    """
    if isinstance(obj, TorchModule):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        for key, value in obj.items():
            if isinstance(value, np.ndarray):
                out[str(key)] = value
            elif isinstance(value, (Mapping, TorchModule)):
                for sub, arr in state_dict(value).items():
                    out[f"{key}.{sub}"] = arr
        return out
    raise TypeError(f"expected a TorchModule or a dict of arrays, got {type(obj).__name__}")


def load_state_dict(path: str | os.PathLike, allow_modules: bool = False,
                    **kwargs) -> "collections.OrderedDict[str, np.ndarray]":
    """``state_dict(load_torch_file(path, allow_modules, **kwargs))``."""
    return state_dict(load_torch_file(path, allow_modules, **kwargs))
