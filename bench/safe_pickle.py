"""Reading pickled files without running their code.

A pickle is a program: unpickling calls whatever callables the file names. bench never lets an input
file run code; every pickled input is read here (docs/FAULTS.md, "What each pickle reader trusts"):

* :func:`load_torch` -- checkpoints (``.pt``/``.pth``/``.ckpt``/``.bin``). First ``torch.load`` with
  ``weights_only=True`` (torch's own allow-list: tensors, storages, plain containers). A ``torch.save``
  zip file that names anything else -- a PyTorch Lightning checkpoint's hyper-parameters, callback or
  scheduler state -- is then read by :class:`TensorUnpickler`: it builds tensors and plain containers from
  an explicit allow-list and turns every other object into an inert :class:`Skipped` (its name only:
  nothing is imported, called or set). There is no other path: ``weights_only=False`` is never used.
* :func:`load_plain_pickle` -- pickles of numpy arrays and plain containers (Probe3D's NYU ``.pkl``,
  submitit's result files): any other global is refused.

Refusals raise :class:`PickleRefused` with a message of our own (never torch's advice to retry unsafely).
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch


class PickleRefused(ValueError):
    """A pickled file bench will not (or cannot) read; the message is bench's own, one line."""


class Skipped:
    """Stands in for an object of a class bench does not load (e.g. a Lightning hyper-parameter).

    Creating, calling, filling or setting state on it does nothing; ``origin`` names the global."""

    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Skipped":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "Skipped":
        return self

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<skipped {self.origin}>"


def _skipped(full: str) -> type:
    return type("Skipped", (Skipped,), {"origin": full})


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; only the latin-1 codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin-1 text")
    return text.encode("latin1")


def _tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` without backward hooks (a pickle could name callables there)."""
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict(), metadata)


def _parameter(data, requires_grad=True, hooks=None):
    """``torch._utils._rebuild_parameter`` without backward hooks."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a Parameter of a non-tensor")
    return torch.nn.Parameter(data, bool(requires_grad))


_BUILTINS = {
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "builtins.slice": slice,
    "builtins.bytearray": bytearray,
    "_codecs.encode": _latin1_encode,
    "collections.OrderedDict": OrderedDict,
}

#: pickled storage classes -> element dtype (``torch.save``'s ``('storage', torch.<X>Storage, key, ...)``)
_STORAGES = {
    "torch.DoubleStorage": torch.float64,
    "torch.FloatStorage": torch.float32,
    "torch.HalfStorage": torch.float16,
    "torch.BFloat16Storage": torch.bfloat16,
    "torch.LongStorage": torch.int64,
    "torch.IntStorage": torch.int32,
    "torch.ShortStorage": torch.int16,
    "torch.CharStorage": torch.int8,
    "torch.ByteStorage": torch.uint8,
    "torch.BoolStorage": torch.bool,
    "torch.ComplexDoubleStorage": torch.complex128,
    "torch.ComplexFloatStorage": torch.complex64,
    "torch.UntypedStorage": torch.uint8,
}


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _torch_allowed() -> Dict[str, Any]:
    allowed: Dict[str, Any] = dict(_BUILTINS)
    allowed.update(
        {
            "torch._utils._rebuild_tensor_v2": _tensor_v2,
            "torch._utils._rebuild_parameter": _parameter,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
        }
    )
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    allowed.update({k: _StorageType(v) for k, v in _STORAGES.items()})
    return allowed


def _numpy_allowed() -> Dict[str, Any]:
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    allowed: Dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for prefix in ("numpy.core", "numpy._core"):  # pickles name the module of the numpy that wrote them
        allowed[f"{prefix}.multiarray._reconstruct"] = core.multiarray._reconstruct
        allowed[f"{prefix}.multiarray.scalar"] = core.multiarray.scalar
        allowed[f"{prefix}.numeric._frombuffer"] = core.numeric._frombuffer
    return allowed


class _AllowList(pickle.Unpickler):
    """Resolves only the globals in ``allowed``; :meth:`unknown` decides about the rest."""

    allowed: Dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 pickles use Python 2 names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        full = f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        return self.unknown(full)

    def unknown(self, full: str) -> Any:
        raise pickle.UnpicklingError(f"it names {full}, which bench does not load")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it refers to external data (a persistent id)")


class TensorUnpickler(_AllowList):
    """The ``data.pkl`` of a ``torch.save`` zip file: tensors (storages read from the zip's records),
    plain containers, dtypes/devices/sizes; every other global becomes an inert :class:`Skipped`."""

    def __init__(self, file: io.BufferedIOBase, storage: Callable[[str, torch.dtype, int], Any]) -> None:
        super().__init__(file)
        self.allowed = _torch_allowed()
        self.storage = storage
        self.skipped: Dict[str, type] = {}

    def unknown(self, full: str) -> Any:
        if full not in self.skipped:
            self.skipped[full] = _skipped(full)
        return self.skipped[full]

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError("it refers to external data other than tensor storages")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError("it has a malformed tensor storage reference")
        return self.storage(key, stype.dtype, numel)


def _read_record(zf: zipfile.ZipFile, name: str) -> bytearray:
    info = zf.getinfo(name)
    buf = bytearray(info.file_size)
    view, n = memoryview(buf), 0
    with zf.open(info) as f:
        while n < len(buf):
            got = f.readinto(view[n:])
            if not got:
                raise pickle.UnpicklingError(f"record {name} is truncated")
            n += got
    return buf


def _load_torch_zip(path: Path) -> Any:
    """Read a ``torch.save`` zip file with :class:`TensorUnpickler` (tensors on the CPU)."""
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise PickleRefused("it is a zip file but not a torch.save checkpoint (no <name>/data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        if prefix + "byteorder" in zf.namelist():
            order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order != sys.byteorder:
                raise PickleRefused(f"its tensors are stored {order}-endian; this machine is {sys.byteorder}-endian")
        cache: Dict[str, Any] = {}

        def storage(key: str, dtype: torch.dtype, numel: int) -> Any:
            if key not in cache:
                try:
                    buf = _read_record(zf, f"{prefix}data/{key}")
                except KeyError:
                    raise pickle.UnpicklingError(f"tensor storage record {key} is missing") from None
                size = torch.empty((), dtype=dtype).element_size()
                if len(buf) != numel * size:
                    raise pickle.UnpicklingError(f"tensor storage {key} has {len(buf)} bytes, not {numel} x {size}")
                raw = torch.frombuffer(buf, dtype=torch.uint8).untyped_storage() if buf else torch.UntypedStorage(0)
                cache[key] = torch.storage.TypedStorage(wrap_storage=raw, dtype=dtype, _internal=True)
            return cache[key]

        unpickler = TensorUnpickler(io.BytesIO(zf.read(pkls[0])), storage)
        obj = unpickler.load()
    if isinstance(obj, Skipped):
        raise PickleRefused(f"it is a pickled {obj.origin} object or call, which bench never runs")
    return obj


def _globals_named(path: Path, limit: int = 1 << 20) -> list:
    """The globals the first pickle of ``path`` names (a static scan of at most ``limit`` bytes; nothing runs)."""
    with open(path, "rb") as f:
        data = f.read(limit)
    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if op.name == "STOP":
                break
    except Exception:  # a truncated scan or not a pickle: report what was seen
        pass
    allowed = _torch_allowed()
    return [
        n for n in dict.fromkeys(names) if n not in allowed and n.replace("__builtin__.", "builtins.") not in allowed
    ]


def _reason(e: BaseException) -> str:
    """A one-line reason from a loader exception, without torch's advice to load unsafely."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text) or re.search(r"(Unsupported global: GLOBAL \S+)", text)
    if "weights_only" in text or "Weights only" in text:
        text = m.group(1) if m else "it holds objects other than tensors and plain containers"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    if "weights_only" in line or "add_safe_globals" in line:  # torch's allow-list advice: name the global only
        g = re.search(r"GLOBAL (\S+)", line)
        line = f"it names {g.group(1)}" if g else "it holds objects other than tensors and plain containers"
    return line[:300]


def load_torch(path: str | Path) -> Any:
    """A checkpoint's content, tensors on the CPU, without running any code it names (see module doc).

    Raises :class:`PickleRefused` (our one-line reason) for anything it cannot read that way."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: the refusal says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(path):  # a torch.save zip naming other globals (e.g. Lightning): tensors only
            try:
                return _load_torch_zip(path)
            except PickleRefused:
                raise
            except Exception as e2:
                raise PickleRefused(f"it is not readable as tensor data ({type(e2).__name__}: {_reason(e2)})") from None
        names = _globals_named(path)
        if names:
            raise PickleRefused(f"it is a pickle that names {', '.join(names[:3])}, which bench never runs") from None
        raise PickleRefused(f"it is not readable as tensor data ({_reason(e)})") from None
    except Exception as e:
        raise PickleRefused(f"{type(e).__name__}: {_reason(e)}") from None


class _PlainUnpickler(_AllowList):
    def __init__(self, file: io.BufferedIOBase, allowed: Dict[str, Any]) -> None:
        super().__init__(file)
        self.allowed = allowed


def load_plain_pickle(path: str | Path, numpy: bool = False) -> Any:
    """A pickle of plain containers (and, with ``numpy``, numpy arrays and scalars); any other global is
    refused with :class:`PickleRefused` before it is resolved, so nothing the file names is run."""
    allowed = {**_BUILTINS, **(_numpy_allowed() if numpy else {})}
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, allowed).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise PickleRefused(_reason(e) or type(e).__name__) from None


def describe_skipped(obj: Any, limit: int = 3) -> Optional[str]:
    """Names of the :class:`Skipped` objects in a loaded checkpoint (for error messages), or None."""
    seen: Dict[str, None] = {}

    def walk(x: Any, depth: int) -> None:
        if len(seen) >= limit or depth > 6:
            return
        if isinstance(x, Skipped):
            seen[x.origin] = None
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, depth + 1)

    walk(obj, 0)
    return ", ".join(seen) or None
