"""NumPy arrays without pickling: dtype and shape in a small header, the data copied once.

Rule: the only module that knows numpy, and it never imports it at module
level: numpy is loaded the first time an array is decoded, so shmbus costs
nothing to users who never send one (encoding only needs the array's own
attributes). The header's description is msgpack, which only ``_codec``
calls: it hands its ``pack_meta``/``unpack_meta`` to ``encode``/``decode``.

An array record's payload (kind 4) is::

    0  u16 header length H (a multiple of 16, so the data is 16-byte aligned)
    2  u16 length M of the msgpack that follows
    4  msgpack [descr, [shape...]] (M bytes), then zero padding up to H, where
       descr is numpy's ``dtype_to_descr`` (a string such as "<f4", or a list
       of [name, descr] for structured dtypes)
    H  the array's bytes, C order
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from ._errors import DecodeError, EncodeError

__all__ = ["is_ndarray", "encode", "decode"]

_LEN = struct.Struct("<HH")


def is_ndarray(obj: object) -> bool:
    """True for a ``numpy.ndarray`` (checked by name, so numpy need not be imported)."""
    t = type(obj)
    return t.__name__ == "ndarray" and t.__module__ == "numpy"


def encode(arr: Any, pack_meta: Callable[[list[Any]], bytes]) -> tuple[bytes, memoryview | bytes]:
    """The header and the data of an array: ``(prefix, body)``, body without a copy when contiguous.

    ``pack_meta`` encodes the ``[descr, shape]`` description (``_codec``'s msgpack).

    Raises ``EncodeError`` for an array that could not come back equal: one
    of Python objects, or a structured dtype whose fields overlap or are out
    of order (numpy cannot describe its layout as a field list).
    """
    if arr.dtype.hasobject:
        raise EncodeError("an array of Python objects cannot travel without pickle: convert it first")
    from numpy.lib.format import dtype_to_descr  # numpy is loaded: we hold one of its arrays

    try:
        meta = pack_meta([dtype_to_descr(arr.dtype), list(arr.shape)])
    except (ValueError, TypeError, OverflowError) as e:
        raise EncodeError(
            f"cannot send an array of dtype {arr.dtype} ({e}): give it a dtype whose fields are "
            "in order and do not overlap, such as numpy.lib.recfunctions.repack_fields(arr)"
        ) from e
    size = (_LEN.size + len(meta) + 15) & ~15
    if size > 0xFFFF:
        raise EncodeError(f"the description of dtype {arr.dtype} is too long to send ({size} bytes)")
    prefix = (_LEN.pack(size, len(meta)) + meta).ljust(size, b"\0")
    if arr.flags.c_contiguous and arr.size:
        try:
            return prefix, memoryview(arr).cast("B")
        except (ValueError, TypeError):  # datetime64/timedelta64 have no buffer format: copy them
            pass
    return prefix, arr.tobytes()


def _field(field: list[Any]) -> tuple[Any, ...]:
    """One ``[name, descr]`` or ``[name, descr, shape]`` field back as the tuple numpy expects.

    A titled field's name is ``[title, name]``; a nested structure's descr a list of fields.
    """
    name, descr, *shape = field
    out = (tuple(name) if isinstance(name, list) else name, _tuples(descr))
    return (*out, tuple(shape[0])) if shape else out


def _tuples(descr: Any) -> Any:
    """msgpack turns the tuples of a structured dtype's description into lists: turn them back."""
    if isinstance(descr, list):
        return [_field(field) if isinstance(field, list) else field for field in descr]
    return descr


def _parse(buf: Any, unpack_meta: Callable[[bytes], Any]) -> tuple[Any, Any, int]:
    try:
        from numpy.lib.format import descr_to_dtype
    except ImportError as e:
        raise DecodeError(f"an array message needs numpy, which cannot be imported here ({e})") from e
    try:
        size, m = _LEN.unpack_from(buf)
        if _LEN.size + m > size:
            raise ValueError("array header lengths disagree")
        descr, shape = unpack_meta(bytes(buf[_LEN.size : _LEN.size + m]))
        dtype = descr_to_dtype(_tuples(descr))
        if dtype.hasobject or size % 16 or size > len(buf):
            raise ValueError("bad array header")
        shape = tuple(int(d) for d in shape)
        count = 1
        for d in shape:
            count *= d
        if any(d < 0 for d in shape):
            raise ValueError("a negative dimension")
        if count * dtype.itemsize != len(buf) - size:
            raise ValueError("array data length does not match its shape")
    except DecodeError:
        raise
    except Exception as e:  # a hostile header reaches numpy, which raises many unrelated types
        raise DecodeError(f"an array message is malformed ({type(e).__name__}: {e})") from e
    return dtype, shape, size


def decode(buf: Any, unpack_meta: Callable[[bytes], Any]) -> Any:
    """An array over ``buf``: writable over a ``bytearray`` copied out of the ring, read-only over a view.

    ``unpack_meta`` decodes the description (``_codec``'s msgpack). Raises
    ``DecodeError`` for every problem: a malformed header, or numpy missing
    in this process.
    """
    dtype, shape, size = _parse(buf, unpack_meta)
    import numpy as np  # _parse imported it

    try:
        if dtype.itemsize == 0:  # no data to wrap (frombuffer refuses it)
            return np.zeros(shape, dtype)
        return np.frombuffer(buf, dtype=dtype, offset=size).reshape(shape)
    except Exception as e:  # e.g. more dimensions than numpy allows
        raise DecodeError(f"an array message is malformed ({type(e).__name__}: {e})") from e
