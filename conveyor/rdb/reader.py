"""The RDB primitives a serialized value is made of: lengths, strings, doubles, times.

Formats as Redis' rdb.c writes them (rdbSaveLen, rdbSaveRawString, rdbSaveLzfBlob,
rdbSaveDoubleValue, rdbSaveBinaryDoubleValue, rdbSaveMillisecondTime).
"""
from __future__ import annotations

import struct

from conveyor.rdb.lzf import lzf_decompress
from conveyor.rdb.model import RdbDecodeError

# Two top bits of a length byte (rdb.h).
_LEN_6BIT, _LEN_14BIT, _LEN_32OR64, _ENCVAL = 0, 1, 2, 3
_LEN_32BIT, _LEN_64BIT = 0x80, 0x81
# Special string encodings, under _ENCVAL.
ENC_INT8, ENC_INT16, ENC_INT32, ENC_LZF = 0, 1, 2, 3

_INT_FORMATS = {ENC_INT8: struct.Struct("<b"), ENC_INT16: struct.Struct("<h"),
                ENC_INT32: struct.Struct("<i")}
_U32_BE = struct.Struct(">I")
_U64_BE = struct.Struct(">Q")
_I64_LE = struct.Struct("<q")
_F64_LE = struct.Struct("<d")


class Reader:
    """A cursor over ``buf[pos:end]`` that fails with RdbDecodeError, never reads past ``end``."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def _need(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.end:
            raise RdbDecodeError(f"truncated payload: {what} needs {n} bytes at offset {start}, "
                                 f"{self.end - start} left")
        self.pos = start + n
        return start

    def take(self, n: int, what: str = "data") -> bytes:
        start = self._need(n, what)
        return self.buf[start:start + n]

    def byte(self, what: str = "byte") -> int:
        return self.buf[self._need(1, what)]

    def remaining(self) -> int:
        return self.end - self.pos

    def _len_or_encoding(self) -> tuple[int, bool]:
        """rdbLoadLenByRef: (length, False), or (encoding kind, True) for a special string."""
        first = self.byte("length")
        kind = first >> 6
        if kind == _ENCVAL:
            return first & 0x3F, True
        if kind == _LEN_6BIT:
            return first & 0x3F, False
        if kind == _LEN_14BIT:
            return ((first & 0x3F) << 8) | self.byte("length"), False
        if first == _LEN_32BIT:
            return _U32_BE.unpack_from(self.buf, self._need(4, "32-bit length"))[0], False
        if first == _LEN_64BIT:
            return _U64_BE.unpack_from(self.buf, self._need(8, "64-bit length"))[0], False
        raise RdbDecodeError(f"unknown length encoding byte 0x{first:02x}")

    def length(self) -> int:
        n, encoded = self._len_or_encoding()
        if encoded:
            raise RdbDecodeError("a special string encoding where a length was expected")
        return n

    def string(self) -> bytes:
        """rdbGenericLoadStringObject: raw, integer-encoded (as its decimal text) or LZF."""
        n, encoded = self._len_or_encoding()
        if not encoded:
            return self.take(n, "string")
        if n == ENC_LZF:
            compressed_len = self.length()
            plain_len = self.length()
            return lzf_decompress(self.take(compressed_len, "LZF string"), plain_len)
        fmt = _INT_FORMATS.get(n)
        if fmt is None:
            raise RdbDecodeError(f"unknown string encoding {n}")
        return b"%d" % fmt.unpack_from(self.buf, self._need(fmt.size, "integer string"))[0]

    def double_text(self) -> float:
        """rdbLoadDoubleValue (ZSET type 3): a length byte with 253/254/255 for nan/inf/-inf."""
        n = self.byte("double")
        if n == 255:
            return float("-inf")
        if n == 254:
            return float("inf")
        if n == 253:
            return float("nan")
        text = self.take(n, "double")
        try:
            return float(text)
        except ValueError:
            raise RdbDecodeError(f"bad double {text!r}") from None

    def double_binary(self) -> float:
        return _F64_LE.unpack_from(self.buf, self._need(8, "binary double"))[0]

    def millis(self) -> int:
        """A signed 64-bit little-endian millisecond time (RDB >= 9, every version we read)."""
        return _I64_LE.unpack_from(self.buf, self._need(8, "millisecond time"))[0]

    def stream_id(self) -> tuple[int, int]:
        """A raw 128-bit stream id as the radix trees key it: ms then seq, both big endian."""
        start = self._need(16, "stream id")
        return _U64_BE.unpack_from(self.buf, start)[0], _U64_BE.unpack_from(self.buf, start + 8)[0]
