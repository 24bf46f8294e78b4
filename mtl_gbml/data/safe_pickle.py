"""A restricted unpickler for the datasets' pickle files (pickles are code: never ``pickle.load``).

It admits only what the distribution files hold: dicts, lists, tuples, str, bytes, ints, floats,
bools and None (plain pickle opcodes, no import needed), numpy arrays, dtypes and scalars (the
reconstruction functions numpy's pickles name, under both ``numpy.core`` and ``numpy._core``),
``collections.OrderedDict``, and ``_codecs.encode`` for Latin-1 only (how protocol-2 pickles write
bytes, e.g. Python 2 era numpy arrays). Any other global (``os.system``, ``builtins.eval``,
``subprocess.Popen``, ...) is refused *before* it is looked up, so nothing runs.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle

import numpy as np

from mtl_gbml.data.errors import DataError


def _numpy_attr(module: str, name: str):
    """The numpy object a pickle names as ``numpy.core.X.name`` or ``numpy._core.X.name``."""
    sub = module.split(".", 2)[-1]  # 'multiarray' | 'numeric'
    try:
        core = np._core  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        core = np.core
    return getattr(getattr(core, sub), name)


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` restricted to the text codecs that pickle protocol 2 uses for bytes."""
    if codecs.lookup(encoding).name not in ("iso8859-1", "latin-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not admitted")
    if not isinstance(obj, str):
        raise pickle.UnpicklingError("_codecs.encode of a non-string is not admitted")
    return codecs.encode(obj, encoding, errors)


_NUMPY_FUNCS = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),  # protocol 5 pickles of arrays
}
_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only the names listed in this module."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        parts = module.split(".")
        if (
            len(parts) == 3
            and parts[0] == "numpy"
            and parts[1] in ("core", "_core")
            and (parts[2], name) in _NUMPY_FUNCS
        ):
            return _numpy_attr(module, name)
        # everything else (os.system, builtins.eval, ...) is refused without being imported
        raise pickle.UnpicklingError(
            f"refused to load global {module}.{name}: not a type that dataset files hold"
        )


def loads(data: bytes, encoding: str = "latin1"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``latin1`` reads Python 2 pickles)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def load(path: str | os.PathLike, expected: str, encoding: str = "latin1"):
    """Unpickle the file at ``path`` safely.

    Raises :class:`DataError` naming the file and ``expected`` (a description of the format) when
    the file is missing, truncated, not a pickle, or holds anything but plain data.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"missing file {path}; expected {expected}")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding=encoding).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path} is not a plain-data pickle ({e}); expected {expected}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise DataError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e}); expected {expected}"
        ) from e


def load_fileobj(f, where: str, expected: str, encoding: str = "latin1"):
    """As :func:`load`, from an open binary file object (e.g. a tar member) named ``where``."""
    try:
        return RestrictedUnpickler(f, encoding=encoding).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{where} is not a plain-data pickle ({e}); expected {expected}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise DataError(
            f"{where} is not a readable pickle ({type(e).__name__}: {e}); expected {expected}"
        ) from e


def str_keys(d: dict) -> dict:
    """A dict with ``bytes`` keys (Python 2 pickles read with ``encoding='bytes'``) as ``str``."""
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
