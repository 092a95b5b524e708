"""Compare source and target key by key: missing, type, value, ttl, and keys only in the target.

Per batch: one pipeline per server reads DUMP + expiry of every key, so equal keys cost no
extra round trip. Where DUMP bytes differ, the types are asked and typed values are compared
(encodings differ between server versions). Keys that differ are re-checked after a short delay before being reported, so a
key written during the compare is not a false alarm.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Callable

import redis

from conveyor import packed
from conveyor.cluster import is_cluster, primary_clients
from conveyor.acl import is_noperm, refused_line, user_of
from conveyor.words import text
from conveyor.endpoints import server_info
from conveyor.errors import ConveyorError, SourceError, TargetError
from conveyor.events import now_millis
from conveyor.keys import KeyFilter, KeyRewriter
from conveyor.kept import KeptKeys
from conveyor.rate import UNLIMITED, Pacer
from conveyor.verify.report import Diff, VerifyReport
from conveyor.verify.typed import PAGE, read_typed

WHOLE_PAGE = {"hash": "HSCAN", "set": "SSCAN", "zset": "ZSCAN"}


@dataclass
class _Side:
    client: redis.Redis
    absolute: bool               # PEXPIRETIME available
    error: type[ConveyorError]
    name: str

    def failed(self, what: str, e: Exception) -> ConveyorError:
        """One line: a refused permission names the command to grant, else ``what`` failed."""
        line = refused_line(e, self.name, user_of(self.client))
        return self.error(line or f"{self.name} {what} failed during verify: {e}")

    def commands(self, keys: list[bytes]) -> list[tuple]:
        expiry = "PEXPIRETIME" if self.absolute else "PTTL"
        return [c for k in keys for c in (("DUMP", k), (expiry, k))]

    def check(self, replies: list) -> list:
        for r in replies:
            if isinstance(r, Exception):
                raise self.failed("read", r)
        return replies

    def expiry(self, now: int, raw: int) -> int | None:
        if raw < 0:
            return None
        return raw if self.absolute else now + raw


class Verifier:
    def __init__(self, *, source: redis.Redis, target: redis.Redis, key_filter: KeyFilter,
                 rewriter: KeyRewriter, ttl_tolerance_ms: int = 1000, recheck_delay: float = 1.0,
                 scan_count: int = 1000, batch: int = 1000, check_extra: bool = True,
                 stream_ids: str = "keep", on_progress: Callable[[int, int], None] | None = None,
                 pacer: Pacer = UNLIMITED, sample: int | None = None,
                 kept: KeptKeys | None = None) -> None:
        """``pacer``: --max-rate (keys scanned per second, each side) and --max-bytes-rate
        (value bytes read from the source); ``sample``: compare that many random source keys
        (RANDOMKEY) instead of scanning both sides; ``kept``: keys the target held before,
        left alone by --on-existing skip (their differences are counted apart)."""
        self.sample, self.kept = sample, kept
        self._target_db = 0 if is_cluster(target) else int(
            target.connection_pool.connection_kwargs.get("db") or 0)
        self.filter, self.rewriter = key_filter, rewriter
        self.tolerance, self.recheck_delay = ttl_tolerance_ms, recheck_delay
        self.scan_count, self.batch, self.check_extra = scan_count, batch, check_extra
        self.on_progress = on_progress
        self.stream_ids = stream_ids
        self.pacer = pacer
        self.src = self._side(source, SourceError, "source")
        self.dst = self._side(target, TargetError, "target")
        self._stop = threading.Event()
        self._mapped: set[bytes] = set()    # digests of target names, for regex rewrites only

    @staticmethod
    def _side(client, err, name) -> _Side:
        try:
            info = server_info(client)
        except redis.RedisError as e:
            line = refused_line(e, name, user_of(client))
            raise err(line or f"{name} unreachable for verify: {e}") from e
        return _Side(client, info.has_pexpiretime, err, name)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> VerifyReport:
        report = VerifyReport()
        total = self._dbsize(self.src)
        evicted = self._evicted()
        suspects: list[bytes] = []
        if self.sample is not None:
            report.sampled_of = total
            batches = self._sampled(self.sample, total)
            total = min(self.sample, total)
        else:
            batches = self._scan(self.src, self.filter.scan_args(), self.filter.select)
        for keys in batches:
            if not self.rewriter.invertible:
                self._mapped.update(_digest(self.rewriter(k)) for k in keys)
            suspects += [d.key for d in self._compare(keys)]
            report.checked += len(keys)
            if self.on_progress:
                self.on_progress(report.checked, total)
        extra = (self._extra() if self.check_extra and self.sample is None
                 and not self._stop.is_set() else [])
        if suspects or extra:
            self._stop.wait(self.recheck_delay)
        for i in range(0, len(suspects), self.batch):
            report.diffs += self._compare(suspects[i:i + self.batch])
        report.diffs += self._confirm_extra(extra)
        if self.kept:
            theirs = [d for d in report.diffs if self.kept.holds(self._target_db, d.target_key)]
            report.kept = len(theirs)
            mine = {id(d) for d in theirs}
            report.diffs = [d for d in report.diffs if id(d) not in mine]
        report.complete = not self._stop.is_set()
        if evicted is not None:
            report.evicted = max(0, (self._evicted() or evicted) - evicted)
        return report

    def _evicted(self) -> int | None:
        """The source's evicted_keys (every primary of a cluster); None when INFO is refused."""
        try:
            return sum(int(c.info("stats").get("evicted_keys", 0))
                       for c in primary_clients(self.src.client))
        except redis.RedisError:
            return None

    # -- source side ---------------------------------------------------------------------------
    def _dbsize(self, side: _Side) -> int:
        try:
            return sum(c.dbsize() for c in primary_clients(side.client))
        except redis.RedisError as e:
            line = refused_line(e, side.name, user_of(side.client))
            raise side.error(line or f"{side.name} unreachable for verify: {e}") from e

    def _scan(self, side: _Side, args: dict, select: Callable[[list[bytes]], list[bytes]]):
        """Batches of keys of the side: of every primary of a cluster (one node holds only
        its own slots)."""
        buf: list[bytes] = []
        for node in primary_clients(side.client):
            for keys in self._scan_node(side, node, args):
                buf += select(keys)
                while len(buf) >= self.batch:
                    yield buf[:self.batch]
                    buf = buf[self.batch:]
        if buf and not self._stop.is_set():
            yield buf

    def _sampled(self, n: int, total: int):
        """Batches of up to ``n`` distinct random source keys the filter selects: RANDOMKEY on
        each primary in proportion to the keys it holds, paced as a scan is; a filter that few
        keys pass ends the draw after 20 tries per key asked (fewer keys checked, as said)."""
        seen: set[bytes] = set()
        nodes = [(c, c.dbsize()) for c in primary_clients(self.src.client)] if total else []
        for node, size in nodes:
            want = min(size, round(n * size / total)) if total else 0
            tries, got = 0, 0
            while got < want and tries < 20 * want and not self._stop.is_set():
                ask = self.pacer.batch_for(min(self.batch, want - got))
                self.pacer.wait(self._stop)
                try:
                    p = node.pipeline(transaction=False)
                    for _ in range(ask):
                        p.randomkey()
                    drawn = [k for k in p.execute() if k is not None]
                except redis.RedisError as e:
                    raise self.src.failed("RANDOMKEY", e) from e
                self.pacer.charge(ask)
                tries += ask
                keys = [k for k in self.filter.select(list(dict.fromkeys(drawn)))
                        if k not in seen][:want - got]
                seen.update(keys)
                got += len(keys)
                if keys:
                    yield keys
                if not drawn:
                    break                  # the node emptied meanwhile

    def _scan_node(self, side: _Side, node: redis.Redis, args: dict):
        cursor = 0
        while self.pacer.wait(self._stop) and not self._stop.is_set():
            try:
                cursor, keys = node.scan(cursor, count=self.pacer.batch_for(self.scan_count),
                                         **args)
            except redis.RedisError as e:
                raise side.failed("SCAN", e) from e
            self.pacer.charge(len(keys))
            yield keys
            if int(cursor) == 0:
                break

    def _compare(self, keys: list[bytes]) -> list[Diff]:
        names = [self.rewriter(k) for k in keys] if not self.rewriter.identity else keys
        now = now_millis()
        s, t = self._read_both(keys, names)
        found: list[Diff | None] = [None] * len(keys)
        unequal: list[int] = []            # DUMP bytes differ: their types are asked next
        for i, (sdump, tdump) in enumerate(zip(s[0::2], t[0::2])):
            if sdump is None:
                continue                   # vanished from the source since the scan: no difference
            if tdump is None:
                found[i] = Diff("missing", keys[i], names[i])
            elif sdump != tdump:
                unequal.append(i)
            else:                          # equal DUMP bytes: same type and value
                found[i] = self._ttl(keys[i], names[i], now, s[2 * i + 1], t[2 * i + 1])
        unsure: list[tuple[int, str]] = []  # same type, different DUMP bytes: compared typed
        if unequal:
            st, tt = self._run_both([("TYPE", keys[i]) for i in unequal],
                                    [("TYPE", names[i]) for i in unequal])
            for i, stype, ttype in zip(unequal, self.src.check(st), self.dst.check(tt)):
                stype, ttype = text(stype), text(ttype)
                if stype == "none":
                    continue
                if ttype == "none":
                    found[i] = Diff("missing", keys[i], names[i])
                elif stype != ttype:
                    found[i] = Diff("type", keys[i], names[i], f"{stype} != {ttype}")
                else:
                    unsure.append((i, stype))
        same = self._same_values([(keys[i], names[i], type_) for i, type_ in unsure])
        for (i, type_), ok in zip(unsure, same):
            found[i] = (self._ttl(keys[i], names[i], now, s[2 * i + 1], t[2 * i + 1]) if ok
                        else Diff("value", keys[i], names[i], f"{type_} values differ"))
        return [d for d in found if d is not None]

    def _ttl(self, key: bytes, name: bytes, now: int, sexp: int, texp: int) -> Diff | None:
        d = self._ttl_diff(self.src.expiry(now, sexp), self.dst.expiry(now, texp))
        return Diff("ttl", key, name, d) if d else None

    def _same_values(self, items: list[tuple[bytes, bytes, str]]) -> list[bool]:
        """Typed comparison of each (key, target name, type). Hashes, sets and sorted sets are
        asked for one SCAN page on both sides in one batch: a page that holds the whole value
        (cursor 0) settles it; bigger ones, and other types, are read page by page."""
        same: list[bool | None] = [None] * len(items)
        paged = [j for j, (_, _, type_) in enumerate(items) if type_ in WHOLE_PAGE]
        if paged:
            s, t = self._run_both(
                [(WHOLE_PAGE[items[j][2]], items[j][0], 0, "COUNT", PAGE) for j in paged],
                [(WHOLE_PAGE[items[j][2]], items[j][1], 0, "COUNT", PAGE) for j in paged])
            for j, sr, tr in zip(paged, s, t):
                if (not isinstance(sr, Exception) and not isinstance(tr, Exception)
                        and int(sr[0]) == 0 and int(tr[0]) == 0):
                    type_ = items[j][2]
                    same[j] = _whole(type_, sr[1]) == _whole(type_, tr[1])
        return [ok if ok is not None else self._same_value(*items[j])
                for j, ok in enumerate(same)]

    def _read_both(self, keys: list[bytes], names: list[bytes]) -> tuple[list, list]:
        """DUMP and expiry of each key on both sides, the two servers read at once."""
        s, t = self._run_both(self.src.commands(keys), self.dst.commands(names))
        if self.pacer.bytes_per_s:
            self.pacer.charge(nbytes=sum(len(x) for r in s for x in (r if isinstance(r, list)
                                                                     else (r,))
                                         if isinstance(x, bytes)))
        return self.src.check(s), self.dst.check(t)

    def _run_both(self, source: list[tuple], target: list[tuple]) -> tuple[list, list]:
        if is_cluster(self.src.client) or is_cluster(self.dst.client):
            # Routed per node by conveyor.cluster (each side's nodes at once).
            return self._run_raw(self.src, source), self._run_raw(self.dst, target)
        try:
            s, t = packed.run_on([(self.src.client, source), (self.dst.client, target)])
        except redis.RedisError as e:
            side = self.dst if getattr(e, "batch", 0) else self.src
            raise side.failed("read", e) from e
        return s, t

    @staticmethod
    def _run_raw(side: _Side, commands: list[tuple]) -> list:
        try:
            return packed.run(side.client, commands)
        except redis.RedisError as e:
            raise side.failed("read", e) from e

    @staticmethod
    def _run(side: _Side, commands: list[tuple]) -> list:
        return side.check(Verifier._run_raw(side, commands))

    def _same_value(self, key: bytes, name: bytes, type_: str) -> bool:
        try:
            return self._typed(self.src, key, type_) == self._typed(self.dst, name, type_)
        except redis.ResponseError:
            return False                   # changed type or vanished mid-read: re-checked later
        except redis.RedisError as e:
            raise TargetError(f"typed read failed during verify: {e}") from e

    def _typed(self, side: _Side, key: bytes, type_: str):
        try:
            return read_typed(side.client, key, type_, stream_ids=self.stream_ids)
        except redis.ResponseError as e:
            if is_noperm(e):
                raise side.failed("typed read", e) from e
            raise

    def _ttl_diff(self, s: int | None, t: int | None) -> str:
        if s is None and t is None:
            return ""
        if s is None or t is None:
            return f"expiry: source {s or 'none'}, target {t or 'none'}"
        if abs(s - t) > self.tolerance:
            return f"expiry differs by {t - s} ms"
        return ""

    # -- keys only in the target ---------------------------------------------------------------
    def _belongs(self, name: bytes) -> bytes | None:
        """Source name of a target key that this run is responsible for, else None."""
        if self.rewriter.invertible:
            key = self.rewriter.inverse(name)
            if key is None or not self.filter.accepts_name(key, check_glob=True):
                return None
            return key
        return None if _digest(name) in self._mapped else name

    def _extra(self) -> list[tuple[bytes, bytes]]:
        found = []
        every = (self.rewriter.identity and not self.filter.checks_names
                 and not self.filter.match)        # every target key is ours: no test per key
        for names in self._scan(self.dst, {}, lambda ks: ks):
            cand = ([(n, n) for n in names] if every else
                    [(k, n) for n in names if (k := self._belongs(n)) is not None])
            if self.filter.type and cand:
                cand = self._of_filtered_type(cand)
            if not cand:
                continue
            if not self.rewriter.invertible:
                found += cand              # every source key's image is in _mapped already
                continue
            found += self._absent_in_source(cand)
        return found

    def _of_filtered_type(self, cand: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """With --scan-type, target keys of other types are out of scope."""
        types = self._run(self.dst, [("TYPE", n) for _, n in cand])
        return [c for c, t in zip(cand, types) if text(t) == self.filter.type]

    def _absent_in_source(self, cand: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        if not self.filter.type and not is_cluster(self.src.client):
            # One EXISTS of the whole page first: when the source has every key (the common
            # case) nothing is absent, and no command per key is needed. (Not on a cluster: the
            # keys of a page span slots, which one command may not.)
            (present,) = self._run(self.src, [("EXISTS", *(k for k, _ in cand))])
            if present == len(cand):
                return []
        types = self._run(self.src, [("TYPE", k) for k, _ in cand])
        out = []
        for (k, n), t in zip(cand, types):
            t = text(t)
            if t == "none" or (self.filter.type and t != self.filter.type):
                out.append((k, n))
        return out

    def _confirm_extra(self, extra: list[tuple[bytes, bytes]]) -> list[Diff]:
        if not extra:
            return []
        exists = self._run(self.dst, [("EXISTS", n) for _, n in extra])
        still = [(k, n) for (k, n), e in zip(extra, exists) if e]
        if self.rewriter.invertible:
            still = self._absent_in_source(still)
        return [Diff("extra", k, n, "only in the target") for k, n in still]


def _whole(type_: str, items: list):
    """A comparable hash, set or sorted set from one SCAN page's flat items."""
    if type_ == "set":
        return set(items)
    pairs = zip(items[::2], items[1::2])
    return {m: float(v) for m, v in pairs} if type_ == "zset" else dict(pairs)


def _digest(name: bytes) -> bytes:
    return hashlib.blake2b(name, digest_size=12).digest()
