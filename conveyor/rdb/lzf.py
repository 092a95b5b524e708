"""LZF decompression (liblzf's lzf_d.c), for strings Redis saved with rdbcompression on."""
from __future__ import annotations

from conveyor.rdb.model import RdbDecodeError


def lzf_decompress(data: bytes, expected_len: int) -> bytes:
    """Expand ``data``; its uncompressed length must be exactly ``expected_len`` (the RDB says
    so, and a mismatch means corruption). Output stops growing once past ``expected_len``, so a
    corrupt length cannot make us allocate without bound.

    This is the hot loop of list decoding (every quicklist node is LZF'd), hence the lean body:
    a truncated literal run only shortens the output and is caught by the final length check,
    and a read past the end of ``data`` is an IndexError turned into RdbDecodeError.
    """
    out = bytearray()
    i, n = 0, len(data)
    olen = 0
    try:
        while i < n:
            ctrl = data[i]
            i += 1
            if ctrl < 32:                      # literal run of ctrl+1 bytes
                end = i + ctrl + 1
                out += data[i:end]
                olen += end - i
                i = end
            else:                              # back reference, length in the top 3 bits
                length = ctrl >> 5
                if length == 7:
                    length += data[i]
                    i += 1
                length += 2
                start = olen - ((ctrl & 0x1F) << 8) - data[i] - 1
                i += 1
                if start < 0:
                    raise RdbDecodeError("LZF back reference before the start of the output")
                end = start + length
                if end <= olen:
                    out += out[start:end]
                else:
                    # Overlapping copy: C copies byte by byte, which repeats the last
                    # olen - start bytes.
                    pattern = out[start:]
                    reps, rest = divmod(length, olen - start)
                    out += pattern * reps + pattern[:rest]
                olen += length
            if olen > expected_len:
                raise RdbDecodeError("LZF data expands past its declared length")
    except IndexError:
        raise RdbDecodeError("LZF back reference truncated") from None
    if len(out) != expected_len:
        raise RdbDecodeError(f"LZF data expands to {len(out)} bytes, expected {expected_len}")
    return bytes(out)
