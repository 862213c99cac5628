"""Encoding and decoding messages: the only module that calls ``msgpack`` (or ``msgspec``).

``encode`` runs before any lock is taken and returns the payload as a short
``prefix`` and an optional ``body`` buffer, so that a ``bytes``-like message
goes into the ring with a single copy (the msgpack ``bin`` header is the prefix,
the caller's buffer the body). ``extract`` runs under the lock and copies the
payload out of the ring once; ``finish`` decodes that copy after the lock is
released. A ``bin`` payload is copied out without its header, so large
``bytes`` come back with one copy too.

Decoding is bounded by the payload's own length (msgpack's default for
``unpackb``) and never trusts a length read from the ring beyond that.

``msgspec``, when installed, is a faster coder of the same bytes for the plain
codec: it decodes a payload that cannot hold a msgpack timestamp (which it
would turn into a ``datetime``), and the C path encodes with it a message made
only of the exact types both write alike (``_cfast.c``'s ``plain_tree``); a
batch of such messages C encodes itself, to the same bytes (``pack_plain``),
and a batch of such records ``get_many`` decodes itself, to the same
messages (``dec_plain``).
Whatever it refuses, msgpack does as before, so the bytes and the messages are
the same with it or without it (``tests/test_codec_fast.py`` checks both
ways; CI runs the pure-Python pass with ``SHMBUS_NO_MSGSPEC=1``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable, Final, Union

import msgpack

from . import _ndarray
from ._errors import DecodeError, EncodeError
from ._format import REC_MSGPACK, REC_NDARRAY, REC_RAW

msgspec: Any = None
# Optional: the same msgpack bytes, coded faster (the "fast" extra). SHMBUS_NO_MSGSPEC=1
# (read at import) codes with msgpack alone, as an install without the extra does.
if os.environ.get("SHMBUS_NO_MSGSPEC", "") in ("", "0"):
    try:
        import msgspec
    except ImportError:  # pragma: no cover - depends on the environment
        msgspec = None

__all__ = [
    "Codec",
    "DEFAULT_CODEC",
    "Encoded",
    "Payload",
    "as_bytes_view",
    "extract",
    "extract_range",
    "array_view",
    "is_msgpack",
]

# bytes is the payload still to decode; (value,) is already the final object.
Payload = Union[bytes, tuple[Any]]
Encoded = tuple[int, bytes, Union[memoryview, bytes, None], int]

_unpackb = msgpack.unpackb
_BIN8: Final = 0xC4
_BIN16: Final = 0xC5
_BIN32: Final = 0xC6
_BYTES_TYPES: Final = (bytes, bytearray, memoryview)
# Exact types msgpack packs itself (their subclasses take the general path).
_PLAIN_TYPES: Final = frozenset((dict, list, tuple, str, int, float, bool, type(None)))


# An ext type comes back as the msgpack.ExtType(code, data) that was put: inert data (nothing is
# looked up or run), and put accepts it, so get must return it. A codec's ext_hook overrides this.
_EXT: Final = msgpack.ExtType
# A msgpack timestamp is an ext of type -1 (the byte 0xff): msgspec would decode it
# as a datetime, so a payload holding that byte anywhere is left to msgpack.
_TIMESTAMP_TYPE: Final = b"\xff"


def _ext_from_msgspec(code: int, data: memoryview) -> Any:
    """msgspec's ext hook: an ext type as msgpack gives it (``ExtType``; it refuses codes < 0)."""
    return _EXT(code, bytes(data))


def _fast_coders() -> tuple[Callable[[Any], bytes] | None, Callable[[Any], Any] | None]:
    """msgspec's ``(encode, decode)`` for the plain codec, or ``(None, None)`` without msgspec."""
    if msgspec is None:
        return None, None
    return msgspec.msgpack.Encoder().encode, msgspec.msgpack.Decoder(ext_hook=_ext_from_msgspec).decode


FAST_ENCODE, FAST_DECODE = _fast_coders()


def _pack_array_meta(meta: list[Any]) -> bytes:
    """An array header's ``[descr, shape]`` description, for ``_ndarray`` (which leaves msgpack to us)."""
    return msgpack.packb(meta)  # type: ignore[no-any-return]


def _unpack_array_meta(data: bytes) -> Any:
    """An array header's description back (the data is a hostile header's: ``_ndarray`` checks it)."""
    return msgpack.unpackb(data)


def array_view(buf: memoryview) -> Any:
    """A read-only numpy array over an array message still in the ring, without a copy.

    Use it inside a ``get_view()`` block (the array is valid only there)::

        with q.get_view() as buf:
            total = shmbus.array_view(buf).sum()

    Raises ``DecodeError`` if ``buf`` is not a well-formed array message.
    """
    return _ndarray.decode(buf, _unpack_array_meta)


def _bin_header(n: int) -> bytes:
    if n < 256:
        return bytes((_BIN8, n))
    if n < 65536:
        return bytes((_BIN16, n >> 8, n & 0xFF))
    return bytes((_BIN32,)) + n.to_bytes(4, "big")


def _key(k: Any) -> Any:
    """A map key as it was put: msgpack turned a tuple key into a list, which cannot be a key."""
    return tuple(_key(x) for x in k) if type(k) is list else k


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    return {_key(k): v for k, v in pairs}


def _unpack_again(payload: bytes, kw: dict[str, Any]) -> Any:
    """Decode what the plain ``unpackb`` call refused but ``put`` accepts (the slow path: rare).

    Two things ``put`` writes that ``unpackb`` refuses: a map with tuple keys
    (read back as lists, unhashable: here they become tuples again, unless
    the codec has its own object hook), and a message nested one level deeper
    than msgpack decodes (its packer allows 1025 levels, its unpacker 1024:
    here the outermost container is read by hand, its items by an Unpacker).
    """
    if "object_hook" not in kw and "object_pairs_hook" not in kw:
        kw = {**kw, "object_pairs_hook": _pairs_to_dict}
    head, n, start = payload[0] if payload else 0, -1, 0
    if 0x90 <= head <= 0x9F or 0x80 <= head <= 0x8F:
        n, start = head & 0x0F, 1
    elif head in (0xDC, 0xDE):
        n, start = int.from_bytes(payload[1:3], "big"), 3
    elif head in (0xDD, 0xDF):
        n, start = int.from_bytes(payload[1:5], "big"), 5
    if n < 0 or len(payload) < start:
        return _unpackb(payload, **kw)
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(payload), 1), **kw)
    unpacker.feed(payload[start:])
    is_map = head < 0x90 or head in (0xDE, 0xDF)
    items = [unpacker.unpack() for _ in range(2 * n if is_map else n)]  # each item is >= 1 byte
    if unpacker.tell() != len(payload) - start:
        raise ValueError("extra data after the message")
    if is_map:
        pairs = list(zip(items[::2], items[1::2]))
        if "object_pairs_hook" in kw:
            return kw["object_pairs_hook"](pairs)
        return kw["object_hook"](dict(pairs))
    out: Any = items if kw.get("use_list", True) else tuple(items)
    return kw["list_hook"](out) if "list_hook" in kw else out


def as_bytes_view(data: Any) -> bytes | memoryview:
    """A flat byte view of a buffer: no copy when it is contiguous, one copy otherwise."""
    mv = memoryview(data)
    return mv.cast("B") if mv.c_contiguous else mv.tobytes()


def _encode_error(obj: Any, e: Exception) -> EncodeError:
    return EncodeError(
        f"cannot encode {type(obj).__name__} with msgpack ({e}): send dict, list, "
        "str, bytes, int, float, bool or None, or pass Codec(pack_options="
        "{'default': fn}) to convert your type"
    )


class Codec:
    """How messages are turned into bytes and back (msgpack, with options).

    Parameters:
        pack_options: keyword arguments for ``msgpack.packb`` (e.g.
            ``{"default": fn}`` to encode your own types, ``{"datetime": True}``).
        unpack_options: keyword arguments for ``msgpack.unpackb`` (e.g.
            ``{"use_list": False}`` to get tuples back, ``{"ext_hook": fn}`` to
            turn ext types into your objects: by default one comes back as
            the ``msgpack.ExtType(code, data)`` that was put, and msgpack's
            own timestamp as a ``msgpack.Timestamp``). Map keys of any type are accepted (``strict_map_key``
            is off), so a dict with int keys round-trips, and a tuple key
            comes back a tuple (a list cannot be a key).

    Example::

        codec = shmbus.Codec(unpack_options={"use_list": False})
        q = shmbus.Queue.open("jobs", codec=codec)
    """

    __slots__ = ("_fast_decode", "_packb", "_plain", "_unpack_kw", "pack_options", "unpack_options")

    def __init__(
        self,
        pack_options: Mapping[str, Any] | None = None,
        unpack_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.pack_options = dict(pack_options or {})
        self.unpack_options = dict(unpack_options or {})
        packer = msgpack.Packer(**{"use_bin_type": True, **self.pack_options})
        self._packb: Callable[[Any], bytes] = packer.pack
        self._unpack_kw: dict[str, Any] = {
            "raw": False,
            "strict_map_key": False,
            "ext_hook": _EXT,
            **self.unpack_options,
        }
        self._plain = not self.unpack_options
        # msgspec decodes what the plain unpackb call would, alike (see the module's docstring).
        self._fast_decode = FAST_DECODE if self._plain else None

    def __repr__(self) -> str:
        return f"Codec(pack_options={self.pack_options!r}, unpack_options={self.unpack_options!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Codec)
            and other.pack_options == self.pack_options
            and other.unpack_options == self.unpack_options
        )

    def __hash__(self) -> int:
        return hash((repr(sorted(self.pack_options)), repr(sorted(self.unpack_options))))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Codec, (self.pack_options, self.unpack_options))

    def encode(self, obj: Any) -> Encoded:
        """Return ``(record kind, prefix, body, total length)`` for ``obj``.

        Raises ``EncodeError`` when msgpack cannot encode it.
        """
        if type(obj) in _PLAIN_TYPES:  # the common case first (measured 0.47 -> 0.30 us a dict)
            try:
                data = self._packb(obj)
            except (TypeError, ValueError, OverflowError) as e:
                raise _encode_error(obj, e) from e
            return REC_MSGPACK, data, None, len(data)
        if _ndarray.is_ndarray(obj):
            prefix, body = _ndarray.encode(obj, _pack_array_meta)
            return REC_NDARRAY, prefix, body, len(prefix) + len(body)
        if type(obj) in _BYTES_TYPES:
            body = obj if type(obj) is bytes else as_bytes_view(obj)
            n = len(body)
            prefix = _bin_header(n)
            return REC_MSGPACK, prefix, body, len(prefix) + n
        try:
            data = self._packb(obj)
        except (TypeError, ValueError, OverflowError) as e:
            raise _encode_error(obj, e) from e
        return REC_MSGPACK, data, None, len(data)

    def _c_parts(self) -> tuple[Any, ...]:
        """What the C fast path codes with: ``(pack, unpack or None, unpack's keywords, fast pair, plain)``.

        ``unpack`` only for the plain codec, whose decoded messages are never
        tuples (the C path tells a message from a record that way); with
        ``unpack_options``, decoding stays here, in ``finish``. The fast pair
        (msgspec's, or None) codes the same bytes; C uses the encoder only for
        a message of the types both write alike, and only without ``pack_options``.
        ``plain``: no ``pack_options``, so C may write msgpack's default bytes itself.
        """
        unpack = _unpackb if self._plain else None
        fast_encode = FAST_ENCODE if not self.pack_options else None
        kw = {"strict_map_key": False, "ext_hook": _EXT}
        return self._packb, unpack, kw, fast_encode, self._fast_decode, not self.pack_options

    def finish_many(self, items: list[Any]) -> list[Any]:
        """Decode a batch; if some fail, raise the first error with the rest in its ``decoded``.

        Each item is a ``(kind, payload)`` record, or a message C already
        decoded (never a tuple: see ``_c_parts``).
        """
        if self._plain:
            # One comprehension for the common batch (measured 0.47 -> 0.40 us a
            # small dict); on any failure the loop below redoes it, keeping the good ones.
            fast = self._fast_decode
            try:
                return [
                    x if type(x) is not tuple
                    else fast(x[1]) if fast is not None and x[0] == REC_MSGPACK and type(x[1]) is bytes
                    and _TIMESTAMP_TYPE not in x[1]
                    else _unpackb(x[1], strict_map_key=False, ext_hook=_EXT) if x[0] == REC_MSGPACK
                    and type(x[1]) is bytes
                    else self.finish(*x)
                    for x in items
                ]  # fmt: skip
            except Exception:  # decoded again, one by one, just below
                pass
        out: list[Any] = []
        failed: DecodeError | None = None
        for x in items:
            if type(x) is not tuple:
                out.append(x)
                continue
            try:
                out.append(self.finish(*x))
            except DecodeError as e:
                failed = failed or e
        if failed is not None:
            failed.decoded = out
            raise failed
        return out

    def finish(self, kind: int, payload: Payload) -> Any:
        """Decode a payload copied out by ``extract`` (outside the lock)."""
        if type(payload) is tuple:
            return payload[0]
        if kind == REC_RAW:
            return payload
        if kind == REC_NDARRAY:
            return _ndarray.decode(payload, _unpack_array_meta)
        try:
            if self._plain:  # keyword expansion costs ~150 ns a message: skip it when we can
                fast = self._fast_decode
                if fast is not None and _TIMESTAMP_TYPE not in payload:
                    try:
                        return fast(payload)
                    except Exception:  # msgpack decides: the same message, or its own error
                        pass
                return _unpackb(payload, strict_map_key=False, ext_hook=_EXT)
            return _unpackb(payload, **self._unpack_kw)
        except DecodeError:
            raise
        except Exception as e:  # msgpack raises several unrelated types on bad input
            try:
                return _unpack_again(payload, self._unpack_kw)  # type: ignore[arg-type]
            except DecodeError:
                raise
            except Exception:  # not what put writes: report the first reason
                pass
            raise DecodeError(f"a message is not valid msgpack ({type(e).__name__}: {e})") from e


def is_msgpack(data: bytes | memoryview) -> bool:
    """True if ``data`` is exactly one msgpack object (what a "msgpack" record must hold).

    It walks the structure without building it (``Unpacker.skip``), so a
    bridge can vet bytes from the network before they become a record.
    """
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        unpacker.skip()
    except Exception:  # msgpack raises several unrelated types on bad input
        return False
    return bool(unpacker.tell() == len(data))


def extract_range(buf: Any, a: int, n: int, kind: int = REC_MSGPACK) -> tuple[int, int, bool]:
    """Where the data of the ``n``-byte payload at ``buf[a:]`` lies: ``(start, end, is_bytes)``.

    A msgpack ``bin`` payload (a ``bytes`` message) is its data without the
    header; a raw record is all data; anything else is msgpack to decode.
    """
    if kind != REC_MSGPACK:
        return a, a + n, True
    b0 = buf[a] if n else 0
    if _BIN8 <= b0 <= _BIN32:
        if b0 == _BIN8 and n >= 2 and buf[a + 1] == n - 2:
            return a + 2, a + n, True
        if b0 == _BIN16 and n >= 3 and (buf[a + 1] << 8 | buf[a + 2]) == n - 3:
            return a + 3, a + n, True
        if b0 == _BIN32 and n >= 5 and int.from_bytes(buf[a + 1 : a + 5], "big") == n - 5:
            return a + 5, a + n, True
    return a, a + n, False


def extract(buf: Any, a: int, n: int, kind: int = REC_MSGPACK) -> Payload:
    """Copy the ``n``-byte payload at ``buf[a:]`` out of the ring (under the lock).

    One copy (slicing an ``mmap`` gives ``bytes`` directly); a msgpack ``bin``
    payload is copied without its header, already final. Raw records are
    copied as they are.
    """
    if kind == REC_MSGPACK and n and _BIN8 <= buf[a] <= _BIN32:
        start, end, is_bytes = extract_range(buf, a, n, kind)
        if is_bytes:
            return (bytes(buf[start:end]),)
    if kind == REC_NDARRAY:
        out = bytearray(n)  # writable, so the array that wraps it is too: still one copy
        out[:] = memoryview(buf)[a : a + n]
        return out  # type: ignore[return-value]
    return bytes(buf[a : a + n])


DEFAULT_CODEC: Final = Codec()
