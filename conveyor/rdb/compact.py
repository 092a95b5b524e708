"""The compact blobs Redis stores inside RDB strings: listpack, ziplist, intset, zipmap.

Each parser takes the whole blob and returns its elements in order; integers stay ``int`` here
(callers turn them into the decimal text Redis would reply with). Formats from listpack.c,
ziplist.c, intset.c and zipmap.c.
"""
from __future__ import annotations

import struct

from conveyor.rdb.model import RdbDecodeError

Element = bytes | int


def as_bytes(e: Element) -> bytes:
    """An element as Redis gives it back: integers as their decimal text."""
    return e if isinstance(e, bytes) else b"%d" % e


_LP_HEADER = struct.Struct("<IH")      # total bytes, element count (65535 = "count it yourself")
_ZL_HEADER = struct.Struct("<IIH")     # total bytes, offset of the last entry, element count
_INTSET_HEADER = struct.Struct("<II")  # bytes per element (2, 4, 8), element count
_U32_LE = struct.Struct("<I")
_U32_BE = struct.Struct(">I")
_I16 = struct.Struct("<h")
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_END = 0xFF


def _backlen_size(entry_len: int) -> int:
    """Bytes of the reverse-encoded length after each listpack entry (lpEncodeBacklen)."""
    if entry_len <= 127:
        return 1
    if entry_len < 16383:
        return 2
    if entry_len < 2097151:
        return 3
    if entry_len < 268435455:
        return 4
    return 5


def listpack(blob: bytes) -> list[Element]:
    """Elements of a listpack; strings as bytes, integer encodings as int."""
    if len(blob) < 7:
        raise RdbDecodeError("listpack shorter than its header")
    total, count = _LP_HEADER.unpack_from(blob, 0)
    if total != len(blob) or blob[-1] != _END:
        raise RdbDecodeError("listpack size or terminator is wrong")
    last = total - 1
    out: list[Element] = []
    append = out.append
    pos = 6
    while pos < last:
        b = blob[pos]
        if b < 0x80:                                   # 0xxxxxxx: 7-bit unsigned
            append(b)
            size = 1
        elif b < 0xC0:                                 # 10xxxxxx: string up to 63 bytes
            size = 1 + (b & 0x3F)
            append(blob[pos + 1:pos + size])
        elif b < 0xE0:                                 # 110xxxxx yyyyyyyy: 13-bit signed
            if pos + 2 > last:
                break
            v = ((b & 0x1F) << 8) | blob[pos + 1]
            append(v - 8192 if v >= 4096 else v)
            size = 2
        elif b < 0xF0:                                 # 1110xxxx yyyyyyyy: string up to 4095
            if pos + 2 > last:
                break
            size = 2 + (((b & 0x0F) << 8) | blob[pos + 1])
            append(blob[pos + 2:pos + size])
        elif b == 0xF0:                                # 32-bit length string
            if pos + 5 > last:
                break
            size = 5 + _U32_LE.unpack_from(blob, pos + 1)[0]
            append(blob[pos + 5:pos + size])
        elif b == 0xF1:
            size = 3
            if pos + size > last:
                break
            append(_I16.unpack_from(blob, pos + 1)[0])
        elif b == 0xF2:
            size = 4
            append(int.from_bytes(blob[pos + 1:pos + 4], "little", signed=True))
        elif b == 0xF3:
            size = 5
            if pos + size > last:
                break
            append(_I32.unpack_from(blob, pos + 1)[0])
        elif b == 0xF4:
            size = 9
            if pos + size > last:
                break
            append(_I64.unpack_from(blob, pos + 1)[0])
        else:
            raise RdbDecodeError(f"unknown listpack encoding 0x{b:02x} at offset {pos}")
        pos += size + _backlen_size(size)
    if pos != last:
        raise RdbDecodeError("listpack entry runs past the end of the listpack")
    if count != 65535 and count != len(out):
        raise RdbDecodeError(f"listpack says {count} elements, holds {len(out)}")
    return out


def ziplist(blob: bytes) -> list[Element]:
    """Elements of a ziplist (Redis < 7.0 small lists, hashes, sorted sets)."""
    if len(blob) < 11:
        raise RdbDecodeError("ziplist shorter than its header")
    total, _tail, count = _ZL_HEADER.unpack_from(blob, 0)
    if total != len(blob) or blob[-1] != _END:
        raise RdbDecodeError("ziplist size or terminator is wrong")
    last = total - 1
    out: list[Element] = []
    append = out.append
    pos = 10
    while pos < last:
        pos += 1 if blob[pos] < 254 else 5             # previous entry's length: skip it
        if pos >= last:
            break
        enc = blob[pos]
        top = enc >> 6
        if top == 0:                                   # 00pppppp: string up to 63 bytes
            start, end = pos + 1, pos + 1 + (enc & 0x3F)
        elif top == 1:                                 # 01pppppp qqqqqqqq: 14-bit length, BE
            start = pos + 2
            end = start + (((enc & 0x3F) << 8) | blob[pos + 1])
        elif top == 2:                                 # 10000000 + 32-bit length, BE
            start = pos + 5
            end = start + _U32_BE.unpack_from(blob, pos + 1)[0]
        else:
            start = pos + 1
            if enc == 0xC0:
                end = start + 2
                append(_I16.unpack_from(blob, start)[0])
            elif enc == 0xD0:
                end = start + 4
                append(_I32.unpack_from(blob, start)[0])
            elif enc == 0xE0:
                end = start + 8
                append(_I64.unpack_from(blob, start)[0])
            elif enc == 0xF0:                          # 24-bit signed
                end = start + 3
                append(int.from_bytes(blob[start:end], "little", signed=True))
            elif enc == 0xFE:
                end = start + 1
                append(blob[start] - 256 if blob[start] > 127 else blob[start])
            elif 0xF1 <= enc <= 0xFD:                  # 1111xxxx: 0..12 in the encoding byte
                end = start
                append((enc & 0x0F) - 1)
            else:
                raise RdbDecodeError(f"unknown ziplist encoding 0x{enc:02x} at offset {pos}")
            if end > last:
                break
            pos = end
            continue
        if end > last:
            break
        append(blob[start:end])
        pos = end
    if pos != last:
        raise RdbDecodeError("ziplist entry runs past the end of the ziplist")
    if count != 65535 and count != len(out):
        raise RdbDecodeError(f"ziplist says {count} elements, holds {len(out)}")
    return out


def intset(blob: bytes) -> list[int]:
    """Members of an intset (sets of integers only), ascending."""
    if len(blob) < 8:
        raise RdbDecodeError("intset shorter than its header")
    width, count = _INTSET_HEADER.unpack_from(blob, 0)
    code = {2: "h", 4: "i", 8: "q"}.get(width)
    if code is None:
        raise RdbDecodeError(f"intset with {width}-byte integers")
    if len(blob) != 8 + width * count:
        raise RdbDecodeError("intset length does not match its element count")
    return list(struct.unpack_from(f"<{count}{code}", blob, 8))


def zipmap(blob: bytes) -> list[bytes]:
    """Alternating fields and values of a zipmap (hashes in RDB files of Redis < 2.6)."""
    out: list[bytes] = []
    last = len(blob) - 1
    if last < 1 or blob[last] != _END:
        raise RdbDecodeError("zipmap terminator is wrong")
    pos = 1                                            # byte 0 is a (capped) pair count
    while pos < last:
        for is_value in (False, True):
            n = blob[pos]
            if n == 254:                               # big length: 4 bytes, little endian
                n = _U32_LE.unpack_from(blob, pos + 1)[0]
                pos += 5
            elif n < 254:
                pos += 1
            else:
                raise RdbDecodeError("zipmap ends inside a pair")
            free = 0
            if is_value:
                free = blob[pos]                       # unused bytes after the value
                pos += 1
            if pos + n > last:
                raise RdbDecodeError("zipmap entry runs past the end of the zipmap")
            out.append(blob[pos:pos + n])
            pos += n + free
    if pos != last:
        raise RdbDecodeError("zipmap entry runs past the end of the zipmap")
    return out
