"""One batch of events written into one target database: one pipeline out, then its replies.

Each event becomes a ``Planned`` write (apply/plan.py) (its commands, where its replies start, how it is counted).
A DUMP payload the target refuses is converted to a typed value in a second pipeline; a later
write of the same key in the batch is sent again after the conversion, so per-key order holds.
Nothing is counted until every reply of the batch was read: a TargetUnavailable anywhere makes
the caller write the whole batch again, which every write here tolerates.
"""
from __future__ import annotations

import logging

import redis

from conveyor.apply.plan import NONE, BatchResult, Conversion, How, Planned, Tally
from conveyor.apply.replies import check_replies, raise_for_connection, refused
from conveyor.apply.writes import CHUNK_SCRIPT, chunk_kind, convertible, script_args, temp_key
from conveyor import cluster, values
from conveyor.acl import user_of
from conveyor.cluster import is_cluster
from conveyor.endpoints import server_info
from conveyor.words import text
from conveyor.errors import CodecError
from conveyor.events import Event, Kind, now_millis
from conveyor.keys import KeyRewriter
from conveyor.log import Record
from conveyor.packed import Batch
from conveyor.rdb import decode_dump

# --merge-policy merge adds elements to what the target holds, which is harmless to replay for
# sets, hashes, sorted sets and streams with their ids (SADD, HSET, ZADD, XADD of a known id).
# Appending to a list (or a string, in parts) again on a replay is not: those are replaced whole.
REPLACED_ON_MERGE = frozenset({"LIST"})
BUILT_APART_ON_MERGE = frozenset({"LIST", "STRING"})   # parts go through a temporary key

log = logging.getLogger("conveyor.apply")


class BatchWriter:
    def __init__(self, *, rewriter: KeyRewriter, merge: bool, stream_ids: str) -> None:
        self.rename = None if rewriter.identity else rewriter
        self.merge, self.stream_ids = merge, stream_ids
        # (db, target key) -> temporary key of a part sequence started and not finished yet.
        self.open_parts: dict[tuple[int, bytes], bytes] = {}
        self._v7: dict[int, bool] = {}
        self._user: str | None = None          # the target's ACL user, named in a refusal
        self.redirects = 0                     # cluster redirections and node failures followed

    def redirected(self, e: BaseException) -> None:
        self.redirects += 1

    def forget_targets(self) -> None:
        """The target restarted: its version may have changed."""
        self._v7.clear()

    def write(self, target: redis.Redis, db: int, items: list[tuple[Event, Record]],
              probe=None) -> BatchResult:
        """``probe``: something with ``queue(pipe)`` that adds a reading at the end of the
        pipeline (the data-loss watch); its replies are kept in the result."""
        v7 = self._target_v7(target)
        self._user = user_of(target)           # named when the target refuses a permission
        now = now_millis()
        pipe = Batch()
        res = BatchResult()
        parts = dict(self.open_parts)          # kept only once the target acknowledged
        plan: list[Planned] = []
        cleanups: list[int] = []
        for ev, rec in items:
            key = self.rename(ev.key) if self.rename else ev.key
            try:
                p = self._plan(ev, rec, key, now, v7)
            except CodecError as e:
                res.failed.append((rec, f"key {ev.key!r}: {e}"))
                continue
            stale = _track(parts, db, p)
            if stale is not None:
                cleanups.append(len(pipe))
                pipe.execute_command("DEL", stale)
            p.start = len(pipe)
            pipe.commands += p.commands
            plan.append(p)
        probed = probe is not None and probe.queue(pipe)
        replies = execute(target, pipe, self.redirected)
        if probed:
            res.probe = replies[-3:]
        res.tally.temp_cleaned += sum(replies[i] for i in cleanups)
        convert: list[Conversion] = []
        leftovers: list[bytes] = []
        if not any(isinstance(r, Exception) for r in replies) and not parts_in(plan):
            # The common case, every write taken: counted without looking at each reply.
            for p in plan:
                p.ok = True
                self._count(p, p.how, p.value, res.tally)
        else:
            for p in plan:
                self._settle(p, replies[p.start:p.start + len(p.commands)], res, convert,
                             leftovers)
        if convert:
            self._convert(target, convert, plan, v7, res, leftovers)
        if leftovers:                          # no half-built value left behind
            _execute_commands(target, [("DEL", k) for k in leftovers], self.redirected)
        self.open_parts = parts
        res.removals = sum(p.removals for p in plan) + len(cleanups)
        res.late_removals = len(convert) + len(leftovers)
        return res

    # -- planning ------------------------------------------------------------------------------
    def _plan(self, ev: Event, rec: Record, key: bytes, now: int, v7: bool) -> Planned:
        if ev.chunk is not None:
            return self._plan_part(ev, rec, key, now, v7)
        if ev.kind is not Kind.UPSERT or ev.expired(now):
            how = How.DELETE if ev.kind is not Kind.UPSERT else How.EXPIRE
            return Planned(ev, rec, key, how, [("DEL", key)])
        if ev.payload is not None and not self.merge:
            return Planned(ev, rec, key, How.RESTORE,
                           [("RESTORE", key, ev.expire_at_ms or 0, ev.payload, "REPLACE", "ABSTTL")])
        value = ev.value if ev.value is not None else _decoded(ev)
        w = self.typed(key, value, ev.expire_at_ms, v7)
        how = How.WRITE if ev.value is not None else How.CONVERT
        return Planned(ev, rec, key, how, w.commands, w.tolerated, value)

    def _plan_part(self, ev: Event, rec: Record, key: bytes, now: int, v7: bool) -> Planned:
        ch = ev.chunk
        first, last = ch["index"] == 0, ch["last"]
        if self.merge and ev.value is not None and ev.value["type"] not in BUILT_APART_ON_MERGE:
            # Merge: the parts go straight into the key; every command is harmless to repeat.
            cmds: list[tuple] = []
            tolerated: set[int] = set()
            values.add_value(cmds, tolerated, key, ev.value, stream_ids=self.stream_ids,
                             merge=True, first=first, v7=v7)
            if last:
                if ev.expired(now):
                    cmds.append(("DEL", key))
                elif ev.expire_at_ms is not None:
                    cmds.append(("PEXPIREAT", key, ev.expire_at_ms))
                else:
                    cmds.append(("PERSIST", key))
            return Planned(ev, rec, key, How.PART, cmds, tolerated, ev.value)
        tmp = temp_key(key, ch["id"].encode())
        inner: list[tuple] = []
        if ev.payload is not None:
            inner.append(("APPEND", tmp, ev.payload))
            count = len(ev.payload)
        else:
            values.add_value(inner, set(), tmp, ev.value, stream_ids=self.stream_ids, first=first,
                             v7=v7)
            count = values.elements(ev.value)
        expire = -1 if ev.expire_at_ms is None else (0 if ev.expired(now) else ev.expire_at_ms)
        script = ("EVAL", CHUNK_SCRIPT, 2, tmp, key, ch["index"], ch["offset"], count,
                  1 if last else 0, expire, chunk_kind(ev), *script_args(inner))
        return Planned(ev, rec, key, How.PART, [script], NONE, ev.value, tmp)

    def typed(self, key: bytes, value: dict, expire_at_ms, v7: bool) -> values.Writes:
        whole = not self.merge or value["type"] in REPLACED_ON_MERGE
        return values.write_commands(key, value, into=temp_key(key, b"w") if whole else None,
                                     expire_at_ms=expire_at_ms, stream_ids=self.stream_ids, v7=v7)

    # -- replies -------------------------------------------------------------------------------
    def _settle(self, p: Planned, replies: list, res: BatchResult, convert: list[Conversion],
                leftovers: list[bytes]) -> None:
        errors = [r for i, r in enumerate(replies) if isinstance(r, Exception)
                  and i not in p.tolerated]
        if p.how is How.RESTORE and errors and convertible(errors[0]):
            convert.append(Conversion(p, p.ev.payload, None))
        elif errors:
            res.failed.append((p.rec, f"target refused key {p.ev.key!r}: {errors[0]}"))
            if p.how in (How.WRITE, How.CONVERT):
                leftovers.append(temp_key(p.key, b"w"))
        elif p.how is How.PART:
            self._settle_part(p, replies[-1], res, convert)
        else:
            p.ok = True
            self._count(p, p.how, p.value, res.tally)

    def _settle_part(self, p: Planned, reply, res: BatchResult, convert: list[Conversion]) -> None:
        t = res.tally
        t.chunks += 1
        p.ok = True
        if isinstance(reply, list) and reply and reply[0] == b"refused":
            why = text(reply[1])
            err = refused(why, "RESTORE", self._user)
            if err is not None:
                raise err
            if convertible(why):
                convert.append(Conversion(p, bytes(reply[2]), p.tmp))
            else:
                res.failed.append((p.rec, f"target refused key {p.ev.key!r}: {why}"))
        elif reply == b"orphan":
            t.orphan_chunks += 1
            if p.ev.chunk["last"]:
                log.warning("key %r: last part applied without its first part (the log was "
                            "replayed from the middle of the key); the key is not written",
                            p.ev.key)
        elif reply == b"duplicate":
            t.duplicate_chunks += 1
        elif p.ev.chunk["last"]:
            t.chunked_keys += 1
            if p.value is not None:
                t.pending_dropped += values.pending_dropped(p.value, self.stream_ids, whole=False)
                if self.merge and p.value["type"] in REPLACED_ON_MERGE:
                    t.lists_replaced += 1

    def _count(self, p: Planned, how: How, value: dict | None, t: Tally) -> None:
        if how is How.RESTORE:
            t.restored += 1
        elif how is How.WRITE:
            t.written += 1
        elif how is How.CONVERT:
            t.converted += 1
        elif how is How.DELETE:
            t.deleted += 1
        elif how is How.EXPIRE:
            t.expired += 1
        if value is not None:
            t.pending_dropped += values.pending_dropped(value, self.stream_ids)
            if self.merge and value["type"] in REPLACED_ON_MERGE:
                t.lists_replaced += 1

    # -- DUMP payloads the target refused ------------------------------------------------------
    def _convert(self, target: redis.Redis, convs: list[Conversion], plan: list[Planned], v7: bool,
                 res: BatchResult, leftovers: list[bytes]) -> None:
        now = now_millis()
        pipe = Batch()
        sent: list[tuple[Conversion, dict, int, int]] = []
        for c in convs:
            p = c.planned
            try:
                value = values.from_rdb(decode_dump(c.payload))
            except (CodecError, ValueError) as e:
                res.failed.append((p.rec, f"target refused key {p.ev.key!r} and its DUMP payload "
                                          f"cannot be converted: {e}"))
                continue
            cmds = ([("DEL", p.key)] if p.ev.expired(now)
                    else self.typed(p.key, value, p.ev.expire_at_ms, v7).commands)
            if c.tmp is not None:
                cmds.append(("DEL", c.tmp))
            sent.append((c, value, len(pipe), len(cmds)))
            for cmd in cmds:
                pipe.execute_command(*cmd)
        # Per-key order: a later write of a converted key in this batch reached the target before
        # the conversion did; it is sent again after it.
        later = _later_writes(plan, convs)
        starts = []
        for p in later:
            starts.append(len(pipe))
            for cmd in p.commands:
                pipe.execute_command(*cmd)
        replies = execute(target, pipe, self.redirected)
        for c, value, start, n in sent:
            p = c.planned
            errors = [r for r in replies[start:start + n] if isinstance(r, Exception)]
            if errors:
                res.failed.append((p.rec, f"target refused the converted value of key "
                                          f"{p.ev.key!r}: {errors[0]}"))
                leftovers.append(temp_key(p.key, b"w"))
                continue
            self._count(p, How.CONVERT, value, res.tally)
            if c.tmp is not None:
                res.tally.chunked_keys += 1
        for p, start in zip(later, starts):
            errors = [r for i, r in enumerate(replies[start:start + len(p.commands)])
                      if isinstance(r, Exception) and i not in p.tolerated]
            if errors:
                res.failed.append((p.rec, f"target refused key {p.ev.key!r}: {errors[0]}"))

    def _target_v7(self, target: redis.Redis) -> bool:
        """Whether the target knows Redis 7.0's stream metadata options."""
        k = id(target)
        if k not in self._v7:
            try:
                version = server_info(target).version
            except redis.ResponseError:
                version = (0,)
            except Exception as e:  # noqa: BLE001 - classified in one place
                raise_for_connection(e, user_of(target))
            self._v7[k] = tuple(version) >= (7, 0)
            target.set_response_callback("XCLAIM", lambda response, **_: response)
        return self._v7[k]


def _track(parts: dict[tuple[int, bytes], bytes], db: int, p: Planned) -> bytes | None:
    """Follow the part sequences of each key; return the temporary key of one that can no longer
    complete (its key's events are in log order: a new sequence or a whole state supersedes it)."""
    if not parts and p.tmp is None:
        return None                          # no part sequence open, none started (most keys)
    k = (db, p.key)
    stale = None
    if p.ev.chunk is None or p.ev.chunk["index"] == 0:
        old = parts.pop(k, None)
        stale = old if old is not None and old != p.tmp else None
    if p.tmp is not None:
        if p.ev.chunk["last"]:
            parts.pop(k, None)
        else:
            parts[k] = p.tmp
    return stale


def parts_in(plan: list[Planned]) -> bool:
    """Whether a part is planned (their script replies say how each was taken)."""
    return any(p.how is How.PART for p in plan)


def _later_writes(plan: list[Planned], convs: list[Conversion]) -> list[Planned]:
    """Writes of a key that came after a conversion of that key in the batch, in plan order.
    (Parts are left out: their temporary key is gone; a key is rarely read twice in one batch.)"""
    converted = {id(c.planned) for c in convs}
    last: dict[bytes, int] = {}
    for c in convs:
        last[c.planned.key] = max(last.get(c.planned.key, -1), c.planned.start)
    return [p for p in plan if p.ok and p.how is not How.PART and id(p) not in converted
            and p.key in last and p.start > last[p.key]]


def _decoded(ev: Event) -> dict:
    try:
        return values.from_rdb(decode_dump(ev.payload))
    except ValueError as e:
        raise CodecError(str(e)) from e


def execute(target: redis.Redis, pipe: Batch, on_redirect=None) -> list:
    """``on_redirect``: told of each redirection or node failure a cluster target's batch met
    (conveyor.cluster follows them)."""
    if not len(pipe):
        return []
    try:
        replies = (cluster.run(target, pipe.commands, on_redirect) if is_cluster(target)
                   else pipe.run(target))
    except Exception as e:  # noqa: BLE001 - classified in one place
        raise_for_connection(e, user_of(target))
    check_replies(replies, pipe.commands, user_of(target))
    return replies


def _execute_commands(target: redis.Redis, commands: list[tuple], on_redirect=None) -> list:
    pipe = Batch()
    pipe.commands = list(commands)
    return execute(target, pipe, on_redirect)
