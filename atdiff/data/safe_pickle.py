"""A restricted unpickler for CIFAR-10's python batches: it rebuilds only what the format holds.

The batches are pickled dictionaries of byte strings, lists of ints or byte strings, and NumPy arrays. A pickle
can name any importable callable and the standard loader calls it (``os.system``, ``sys.exit``, ...), so this
loader resolves only the few NumPy reconstructors such arrays need, each wrapped so that it builds plain numeric
arrays and nothing else. Any other global is refused; every failure becomes a ``ValueError`` naming the file.
"""

from __future__ import annotations

import codecs
import os
import pickle
from typing import Any

import numpy as np

try:  # NumPy 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

__all__ = ["safe_load_pickle"]


def _plain_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"arrays of dtype {dtype} are not part of the format")
    return dtype


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, str | bytes):
        raise pickle.UnpicklingError("a dtype is rebuilt from its type code only")
    return _plain_dtype(spec.decode("ascii") if isinstance(spec, bytes) else spec)


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy.ndarray objects are rebuilt")
    return _multiarray._reconstruct(np.ndarray, shape, typecode)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
    if not isinstance(buf, bytes | bytearray | pickle.PickleBuffer) or not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("an array buffer must be bytes with a numpy dtype")
    if axis_order is not None:
        raise pickle.UnpicklingError("arrays with a custom axis order are not part of the format")
    return _numeric._frombuffer(buf, _plain_dtype(dtype), shape, order)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("only latin1 text-to-bytes conversion is allowed")
    return codecs.encode(text, "latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # NumPy 1 spelling (the original files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,  # only ever passed to _reconstruct, which checks it
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,  # bytes pickled by Python 3 at protocol < 3
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: not part of the format") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of the format")


def safe_load_pickle(path: str | os.PathLike, arg: str) -> Any:
    """Unpickle ``path`` (bytes keys kept as bytes) allowing only dicts, lists, strings, numbers and plain
    NumPy arrays. Anything else, or a damaged file, raises ``ValueError`` starting with ``arg`` and naming
    ``path`` (never runs code, never lets ``SystemExit`` or ``KeyboardInterrupt`` from the file through)."""
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as err:
        raise ValueError(f"{arg}: {path} is not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from err
