"""DUMP payload decoding against real servers: every type in every encoding each server writes.

For each server (Redis 6.2 -> RDB 9, Redis 7.0 -> RDB 10, Valkey 8.1 -> RDB 11): write keys,
DUMP them, decode, and compare with what the server itself answers to typed reads. Each case
asserts the OBJECT ENCODING and RDB type byte it means to cover, so a server or config change
cannot silently stop covering one. The only hand-made payloads are corruption cases and the
module-type case (no module can be loaded into the test servers).
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import pytest
import redis

from conveyor.errors import CodecError
from conveyor.rdb import RdbDecodeError, TypedValue, crc64, decode_dump, dump_version
from conveyor.rdb.objects import QUICKLIST_NODE_PLAIN, quicklist2_nodes
from conveyor.rdb.reader import Reader
from tests.servers import start_server

SERVERS = ["redis6.2", "redis7.0", "valkey8.1"]
RDB_VERSION = {"redis6.2": 9, "redis7.0": 10, "valkey8.1": 11}
OLD = "redis6.2"  # ziplists, RDB types 12-15, no consumer active time, no stream metadata


@dataclass
class Source:
    kind: str
    client: redis.Redis
    raw: redis.Redis  # same server, no redis-py reply parsing (keeps repeated stream fields)

    def dump(self, key: str, *, rdb_type: int | dict[str, int], encoding: str | dict[str, str]
             ) -> tuple[bytes, TypedValue]:
        """DUMP and decode ``key`` after checking it has the encoding and RDB type meant."""
        want_enc = encoding if isinstance(encoding, str) else encoding[self.kind]
        assert self.client.object("encoding", key).decode() == want_enc
        payload = self.client.dump(key)
        want_type = rdb_type if isinstance(rdb_type, int) else rdb_type[self.kind]
        assert payload[0] == want_type
        assert dump_version(payload) == RDB_VERSION[self.kind]
        decoded = decode_dump(payload)
        assert decoded.rdb_type == want_type
        return payload, decoded


@pytest.fixture(scope="module", params=SERVERS)
def server(request):
    # DEBUG is needed on Redis 7.0 to lower the plain-node threshold (1 GB by default).
    extra = () if request.param == OLD else ("--enable-debug-command", "yes")
    s = start_server(request.param, extra=extra)
    s.kind = request.param
    yield s
    s.cleanup()


@pytest.fixture
def src(server):
    client, raw = server.client(), server.client()
    raw.response_callbacks.clear()
    client.flushall()
    yield Source(server.kind, client, raw)
    client.close()
    raw.close()


def string_encoding_byte(payload: bytes) -> int:
    """The first byte of a string value: 0xC0-0xC2 integer, 0xC3 LZF, else a plain length."""
    return payload[1]


def node_count(payload: bytes) -> int:
    return Reader(payload, 1, len(payload) - 10).length()


# -- strings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, first_byte, encoding", [
    (b"12", 0xC0, "int"),                      # int8
    (b"-300", 0xC1, "int"),                    # int16
    (b"70000", 0xC2, "int"),                   # int32
    (b"-2147483648", 0xC2, "int"),
    (b"9223372036854775807", 19, "int"),       # too wide for RDB integers: stored as text
    (b"007", 3, "embstr"),                     # not canonical, so not an integer
    (b"", 0, "embstr"),
    (b"\x00\xff binary \r\n", 12, "embstr"),
    (b"abc" * 40, 0xC3, "raw"),                # > 20 bytes and repetitive: LZF
    (bytes(range(256)) * 400, 0xC3, "raw"),    # 100 KB, LZF back references of every length
])
def test_strings_decode_to_their_bytes(src, value, first_byte, encoding):
    src.client.set("k", value)
    payload, decoded = src.dump("k", rdb_type=0, encoding=encoding)
    assert string_encoding_byte(payload) == first_byte
    assert decoded.type == "string" and decoded.value == src.client.get("k") == value


def test_incompressible_long_string_is_stored_plain(src):
    value = random.Random(1).randbytes(300)
    src.client.set("k", value)
    payload, decoded = src.dump("k", rdb_type=0, encoding="raw")
    assert string_encoding_byte(payload) != 0xC3
    assert decoded.value == value


def test_hyperloglog_is_a_string(src):
    src.client.pfadd("hll", *[f"e{i}" for i in range(1000)])
    _, decoded = src.dump("hll", rdb_type=0, encoding="raw")
    assert decoded.type == "string" and decoded.value == src.client.get("hll")
    assert decoded.value.startswith(b"HYLL")


# -- lists -----------------------------------------------------------------------------------------
LIST_TYPE = {"redis6.2": 14, "redis7.0": 18, "valkey8.1": 18}


def test_small_list_keeps_order_and_integer_widths(src):
    values = [b"a", b"0", b"12", b"-1", b"127", b"-4096", b"4095", b"32767", b"-8388608",
              b"2147483647", b"-9223372036854775808", b"9223372036854775807", b"x" * 63,
              b"y" * 64, b"3.14", b""]
    src.client.rpush("l", *values)
    _, decoded = src.dump("l", rdb_type=LIST_TYPE,
                          encoding={"redis6.2": "quicklist", "redis7.0": "quicklist",
                                    "valkey8.1": "listpack"})
    assert decoded.type == "list"
    assert decoded.value == src.client.lrange("l", 0, -1) == values


def test_big_list_spans_several_nodes(src):
    values = [b"%d:" % i + b"v" * (i % 300) for i in range(3000)]
    src.client.rpush("l", *values)
    payload, decoded = src.dump("l", rdb_type=LIST_TYPE, encoding="quicklist")
    assert node_count(payload) > 10
    assert decoded.value == src.client.lrange("l", 0, -1) == values


def test_list_element_longer_than_4095_bytes(src):
    # The 32-bit string length form of ziplist/listpack entries.
    values = [b"s", b"m" * 5000, b"t"]
    src.client.rpush("l", *values)
    _, decoded = src.dump("l", rdb_type=LIST_TYPE,
                          encoding={"redis6.2": "quicklist", "redis7.0": "quicklist",
                                    "valkey8.1": "listpack"})
    assert decoded.value == src.client.lrange("l", 0, -1) == values


def test_list_with_a_plain_node(src):
    # Redis 6.2 has no plain nodes (RDB type 14): there the big element stays a ziplist entry.
    if src.kind == "redis7.0":
        # Valkey makes an element larger than the node size limit a plain node on its own;
        # Redis 7.0 only past quicklist-packed-threshold, which only DEBUG can lower.
        src.client.execute_command("DEBUG", "QUICKLIST-PACKED-THRESHOLD", "8192")
    try:
        values = [b"head", b"p" * 10_000, b"tail"] + [b"n%d" % i for i in range(100)]
        src.client.rpush("l", *values)
    finally:
        if src.kind == "redis7.0":
            src.client.execute_command("DEBUG", "QUICKLIST-PACKED-THRESHOLD", str(1 << 30))
    payload, decoded = src.dump("l", rdb_type=LIST_TYPE, encoding="quicklist")
    if src.kind != OLD:
        containers = [c for c, _ in quicklist2_nodes(Reader(payload, 1, len(payload) - 10))]
        assert QUICKLIST_NODE_PLAIN in containers
    assert decoded.value == src.client.lrange("l", 0, -1) == values


def test_list_with_compressed_nodes(src):
    src.client.config_set("list-compress-depth", 1)
    try:
        values = [b"element-%05d-" % i + b"z" * 50 for i in range(2000)]
        src.client.rpush("l", *values)
    finally:
        src.client.config_set("list-compress-depth", 0)
    payload, decoded = src.dump("l", rdb_type=LIST_TYPE, encoding="quicklist")
    assert node_count(payload) > 3
    assert decoded.value == src.client.lrange("l", 0, -1) == values


# -- sets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("members, width", [
    ([1, -2, 300, 32767, -32768], 2),
    ([1, 70000, -2147483648], 4),
    ([1, 2**40, -(2**63), 2**63 - 1], 8),
])
def test_intset_of_each_width(src, members, width):
    src.client.sadd("s", *members)
    payload, decoded = src.dump("s", rdb_type=11, encoding="intset")
    blob = Reader(payload, 1, len(payload) - 10).string()
    assert struct.unpack_from("<I", blob)[0] == width
    assert decoded.type == "set"
    assert decoded.value == src.client.smembers("s") == {b"%d" % m for m in members}


def test_small_set_of_strings(src):
    members = {b"a", b"bb", b"12", b"-7", b"x" * 60}
    src.client.sadd("s", *members)
    _, decoded = src.dump("s", rdb_type={"redis6.2": 2, "redis7.0": 2, "valkey8.1": 20},
                          encoding={"redis6.2": "hashtable", "redis7.0": "hashtable",
                                    "valkey8.1": "listpack"})
    assert decoded.value == src.client.smembers("s") == members


def test_big_sets(src):
    strings = {b"member:%d" % i for i in range(1000)}
    src.client.sadd("s", *strings)
    src.client.sadd("n", *range(1000))
    src.client.sadd("n", "not-a-number")            # converts the intset to a hashtable
    _, decoded = src.dump("s", rdb_type=2, encoding="hashtable")
    assert decoded.value == src.client.smembers("s") == strings
    _, decoded = src.dump("n", rdb_type=2, encoding="hashtable")
    assert decoded.value == src.client.smembers("n")


# -- sorted sets -----------------------------------------------------------------------------------
SCORES = {b"neg-inf": float("-inf"), b"inf": float("inf"), b"frac": 0.1, b"neg": -2.5,
          b"int": 3.0, b"zero": 0.0, b"huge": 1e300, b"tiny": 5e-324, b"big-int": 2.0**53 + 2,
          b"third": 1 / 3}


def zrange(c: redis.Redis, key: str) -> dict[bytes, float]:
    return dict(c.zrange(key, 0, -1, withscores=True))


def test_small_zset_scores(src):
    src.client.zadd("z", SCORES)
    _, decoded = src.dump("z", rdb_type={"redis6.2": 12, "redis7.0": 17, "valkey8.1": 17},
                          encoding={"redis6.2": "ziplist", "redis7.0": "listpack",
                                    "valkey8.1": "listpack"})
    assert decoded.type == "zset"
    assert decoded.value == zrange(src.client, "z") == SCORES
    assert list(decoded.value) == [m for m, _ in src.client.zrange("z", 0, -1, withscores=True)]


def test_big_zset_is_a_skiplist_with_binary_scores(src):
    scores = dict(SCORES)
    scores.update({b"m%d" % i: i * 0.37 - 50 for i in range(300)})
    src.client.zadd("z", scores)
    _, decoded = src.dump("z", rdb_type=5, encoding="skiplist")
    assert decoded.value == zrange(src.client, "z") == scores
    assert list(decoded.value) == [m for m, _ in src.client.zrange("z", 0, -1, withscores=True)]


def test_zset_with_a_long_member_is_a_skiplist(src):
    src.client.zadd("z", {b"short": 1, b"L" * 100: 2})
    _, decoded = src.dump("z", rdb_type=5, encoding="skiplist")
    assert decoded.value == zrange(src.client, "z")


# -- hashes ----------------------------------------------------------------------------------------
def test_small_hash(src):
    fields = {b"name": b"conveyor", b"n": b"42", b"neg": b"-100000", b"empty": b"",
              b"7": b"seven", b"big": b"9223372036854775807"}
    src.client.hset("h", mapping=fields)
    _, decoded = src.dump("h", rdb_type={"redis6.2": 13, "redis7.0": 16, "valkey8.1": 16},
                          encoding={"redis6.2": "ziplist", "redis7.0": "listpack",
                                    "valkey8.1": "listpack"})
    assert decoded.type == "hash"
    assert decoded.value == src.client.hgetall("h") == fields


def test_big_hash(src):
    fields = {b"field:%d" % i: b"%d" % (i * 7919) for i in range(1000)}
    fields[b"long"] = b"v" * 5000
    src.client.hset("h", mapping=fields)
    _, decoded = src.dump("h", rdb_type=4, encoding="hashtable")
    assert decoded.value == src.client.hgetall("h") == fields


# -- streams ---------------------------------------------------------------------------------------
STREAM_TYPE = {"redis6.2": 15, "redis7.0": 19, "valkey8.1": 21}


def pairs(reply: list | dict) -> dict:
    """A map reply as a dict with str keys, whether it came as a RESP3 map or a RESP2 array."""
    items = reply.items() if isinstance(reply, dict) else zip(reply[0::2], reply[1::2])
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in items}


def server_entries(src: Source, key: str) -> list[tuple[bytes, list[tuple[bytes, bytes]]]]:
    return [(eid, list(zip(fv[0::2], fv[1::2])))
            for eid, fv in src.raw.execute_command("XRANGE", key, "-", "+")]


def assert_stream_matches_server(src: Source, key: str, decoded: TypedValue) -> None:
    """Entries, metadata, groups, PELs and consumers, as XRANGE / XINFO / XPENDING see them."""
    s = decoded.value
    assert decoded.type == "stream"
    assert s.entries == server_entries(src, key)
    full = pairs(src.raw.execute_command("XINFO", "STREAM", key, "FULL", "COUNT", "0"))
    assert s.last_id == full["last-generated-id"]
    if src.kind == OLD:
        assert s.entries_added is None and s.max_deleted_id is None
    else:
        assert s.entries_added == full["entries-added"]
        assert s.max_deleted_id == full["max-deleted-entry-id"]
    groups = [pairs(g) for g in full["groups"]]
    assert [g["name"] for g in s.groups] == [g["name"] for g in groups]
    summaries = {g["name"]: g for g in src.client.xinfo_groups(key)}
    for mine, theirs in zip(s.groups, groups):
        summary = summaries[mine["name"]]
        assert mine["last_delivered_id"] == theirs["last-delivered-id"] == summary["last-delivered-id"]
        assert len(mine["pending"]) == summary["pending"]
        assert len(mine["consumers"]) == summary["consumers"]
        if src.kind == OLD:
            assert mine["entries_read"] is None
        else:
            assert mine["entries_read"] == theirs["entries-read"] == summary["entries-read"]
        # Global PEL: id, owner, absolute delivery time, delivery count.
        assert [(p["id"], p["consumer"], p["delivery_time"], p["delivery_count"])
                for p in mine["pending"]] == [tuple(p) for p in theirs["pending"]]
        xpending = src.client.xpending_range(key, mine["name"], "-", "+", 10_000)
        assert [(p["id"], p["consumer"], p["delivery_count"]) for p in mine["pending"]] == \
            [(p["message_id"], p["consumer"], p["times_delivered"]) for p in xpending]
        # Consumers: name, seen (and active) time, the ids each owns.
        consumers = [pairs(c) for c in theirs["consumers"]]
        assert [c["name"] for c in mine["consumers"]] == [c["name"] for c in consumers]
        for mc, tc in zip(mine["consumers"], consumers):
            assert mc["seen_time"] == tc["seen-time"]
            assert mc["pending"] == [p[0] for p in tc["pending"]]
            if src.kind == "valkey8.1":
                assert mc["active_time"] == tc["active-time"]
            else:
                assert mc["active_time"] is None
        listed = src.client.xinfo_consumers(key, mine["name"])
        assert {c["name"]: c["pending"] for c in listed} == \
            {c["name"]: len(c["pending"]) for c in mine["consumers"]}


def test_small_stream_with_varied_fields(src):
    c = src.client
    c.xadd("x", {"a": "1", "b": "two"}, id="1-1")
    c.xadd("x", {"a": "3", "b": "four"}, id="1-2")              # same fields as the master entry
    c.xadd("x", {"other": "x" * 100, "n": "-77"}, id="5-0")     # different fields
    src.raw.execute_command("XADD", "x", "6-0", "dup", "1", "dup", "2")  # a field twice
    c.xadd("x", {"a": "", "b": "9223372036854775807"}, id="18446744073709551615-0")
    _, decoded = src.dump("x", rdb_type=STREAM_TYPE, encoding="stream")
    assert decoded.value.entries[3] == (b"6-0", [(b"dup", b"1"), (b"dup", b"2")])
    assert decoded.value.groups == []
    assert_stream_matches_server(src, "x", decoded)


def test_big_stream_with_deletes_and_consumer_groups(src):
    c = src.client
    ids = [c.xadd("x", {"sensor": "s%d" % (i % 7), "reading": str(i * 3 - 500),
                        **({"extra": "e" * 70} if i % 50 == 0 else {})})
           for i in range(1200)]
    # Tombstones: first and last of a node, a run in the middle, the stream's last entry.
    c.xdel("x", ids[0], ids[99], ids[100], *ids[500:560], ids[-1])
    c.xgroup_create("x", "readers", id="0")
    c.xgroup_create("x", "late", id="$")
    c.xgroup_create("x", "midway", id=ids[600])
    c.xreadgroup("readers", "alice", {"x": ">"}, count=20)
    c.xreadgroup("readers", "bob", {"x": ">"}, count=7)
    c.xreadgroup("midway", "carol", {"x": ">"}, count=3)
    c.xgroup_createconsumer("x", "readers", "idle-dave")
    pending = [p["message_id"] for p in c.xpending_range("x", "readers", "-", "+", 100)]
    c.xack("x", "readers", *pending[:5])
    c.xclaim("x", "readers", "bob", 0, pending[10:13])          # change owner and count
    c.xclaim("x", "readers", "bob", 0, pending[10:11])
    c.xdel("x", pending[15])                                   # pending, but deleted
    payload, decoded = src.dump("x", rdb_type=STREAM_TYPE, encoding="stream")
    assert node_count(payload) > 10
    assert len(decoded.value.entries) == 1200 - 65           # 64 XDELs above, one more here
    assert {g["name"] for g in decoded.value.groups} == {b"readers", b"late", b"midway"}
    assert_stream_matches_server(src, "x", decoded)


def test_emptied_stream_keeps_ids_and_groups(src):
    c = src.client
    ids = [c.xadd("x", {"f": "v"}) for _ in range(3)]
    c.xgroup_create("x", "g", id="0")
    c.xreadgroup("g", "c1", {"x": ">"})
    c.xdel("x", *ids)
    _, decoded = src.dump("x", rdb_type=STREAM_TYPE, encoding="stream")
    assert decoded.value.entries == []
    assert decoded.value.last_id == ids[-1]
    assert_stream_matches_server(src, "x", decoded)


# -- what cannot be decoded ------------------------------------------------------------------------
def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<Q", crc64(body))


def test_module_values_are_refused_by_name():
    # Synthetic: no module is loadable into the test servers. Module id = 9 name characters of
    # 6 bits each above a 10-bit encoding version (moduleTypeEncodeId).
    charset = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    module_id = 0
    for ch in "ReJSON-RL":
        module_id = (module_id << 6) | charset.index(ch)
    module_id = (module_id << 10) | 3
    payload = with_crc(b"\x07\x81" + module_id.to_bytes(8, "big") + b"\x00" + b"\x0b\x00")
    with pytest.raises(RdbDecodeError, match="module type ReJSON-RL .* cannot be converted"):
        decode_dump(payload)


def test_unknown_types_are_refused():
    with pytest.raises(RdbDecodeError, match="RDB object type 24"):
        decode_dump(with_crc(b"\x18\x00" + b"\x0c\x00"))


# -- corruption ------------------------------------------------------------------------------------
@pytest.fixture
def payloads(src) -> dict[str, bytes]:
    """One real payload of each kind, to corrupt."""
    c = src.client
    c.set("string", "abc" * 50)
    c.rpush("list", *[b"item%d" % i for i in range(2000)])
    c.sadd("set", *range(100))
    c.zadd("zset", {b"m%d" % i: i / 3 for i in range(50)})
    c.hset("hash", mapping={b"f%d" % i: b"v" * i for i in range(20)})
    for i in range(300):
        c.xadd("stream", {"k": i, "pad": "p" * (i % 30)})
    c.xgroup_create("stream", "g", id="0")
    c.xreadgroup("g", "c", {"stream": ">"}, count=10)
    return {k: c.dump(k) for k in ("string", "list", "set", "zset", "hash", "stream")}


def test_flipped_byte_fails_the_checksum(payloads):
    for name, payload in payloads.items():
        for pos in (0, 1, len(payload) // 2, len(payload) - 11, len(payload) - 10, len(payload) - 1):
            bad = bytearray(payload)
            bad[pos] ^= 0x10
            with pytest.raises(RdbDecodeError, match="checksum"):
                decode_dump(bytes(bad))


def test_truncated_payload_is_refused(payloads):
    for name, payload in payloads.items():
        for cut in (1, 5, 10, 11, len(payload) // 2, len(payload) - 1):
            with pytest.raises(RdbDecodeError):
                decode_dump(payload[:cut])
            # Without the checksum, the structure itself must notice the missing bytes.
            body = payload[:-10]
            with pytest.raises(RdbDecodeError):
                decode_dump(body[:max(1, len(body) - cut)] + payload[-10:], verify_checksum=False)


def test_zero_checksum_is_refused_like_restore_refuses_it(src, payloads):
    zeroed = payloads["string"][:-8] + bytes(8)
    with pytest.raises(redis.ResponseError, match="checksum"):
        src.client.restore("copy", 0, zeroed)
    with pytest.raises(RdbDecodeError, match="checksum"):
        decode_dump(zeroed)


def test_random_corruption_only_ever_raises_rdb_decode_error(payloads):
    rng = random.Random(7)
    for name, payload in payloads.items():
        body = payload[:-10]
        for _ in range(150):
            bad = bytearray(body)
            for _ in range(rng.randint(1, 3)):
                bad[rng.randrange(1, len(bad))] = rng.randrange(256)
            try:
                decoded = decode_dump(bytes(bad) + payload[-10:], verify_checksum=False)
            except RdbDecodeError as e:
                assert isinstance(e, CodecError)
            else:
                assert decoded.type == name


def test_dump_version_needs_a_footer():
    with pytest.raises(RdbDecodeError):
        dump_version(b"\x00\x0b")
