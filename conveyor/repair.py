"""``verify --repair --log URI``: the keys verify found different are read again from the source
and appended to the log as ordinary events, by the same reader capture uses (a key gone from the
source, or only on the target, becomes a delete). apply writes them like any other change: their
order with live changes is the log's, and capture and apply may stay on separate networks."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from conveyor.capture.cluster_source import ClusterStateReader
from conveyor.capture.reader import StateReader
from conveyor.cluster import is_cluster
from conveyor.endpoints import server_info
from conveyor.errors import ConfigError
from conveyor.events import Codec
from conveyor.keys import KeyFilter, KeyRewriter
from conveyor.log import MetaStore
from conveyor.members import captures
from conveyor.verify import Diff, VerifyReport
from conveyor.words import counted

BATCH = 1000


@dataclass
class Queued:
    """What a repair appended: keys per kind of difference, and keys it could not queue."""
    by_kind: dict[str, int] = field(default_factory=dict)
    keys: int = 0
    events: int = 0
    unmapped: int = 0                 # target keys of merged databases: no source database


def refuse_unmappable(rewriter: KeyRewriter) -> None:
    """A key only on the target is deleted through its source name: a rewrite that cannot be
    inverted (--key-replace) cannot name it."""
    if not rewriter.identity and not rewriter.invertible:
        raise ConfigError("--repair with --key-replace: the target's names cannot be mapped back "
                          "to source names, so keys only on the target could not be deleted "
                          "(use --key-prefix, or repair without the rewrite)")


def check_log_identity(meta: MetaStore, source_host_port: str, run_ids: set[str],
                       log_masked: str) -> None:
    """A log whose captures read another source must not receive this source's keys (the same
    source: the same address, or the same server run id under another name)."""
    caps = captures(meta.documents())
    sources = sorted({str(c.doc.get("source")) for c in caps if c.doc.get("source")})
    seen_ids = {i for c in caps for i in str(c.doc.get("run_id") or "").split(",") if i}
    if sources and source_host_port not in sources and not (seen_ids & run_ids):
        raise ConfigError(f"--repair: the log {log_masked} holds captures of "
                          f"{', '.join(sources)}, not of the source {source_host_port}: repairs "
                          "go to the log this source's changes go to")


def per_database(report: VerifyReport) -> dict[int | None, list[Diff]]:
    """The differences of each source database (None: the URI's own database)."""
    per_db = getattr(report, "per_db", None)
    if not per_db:
        return {None: report.diffs}
    return {db: rep.diffs for db, rep in per_db.items() if rep.diffs}


def queue(connect, writer, report: VerifyReport, key_filter: KeyFilter) -> Queued:
    """Append events for every differing key of ``report``; ``connect(db)``: a source client
    (db None: the URI's own)."""
    out = Queued()
    capture_id = f"repair-{uuid.uuid4().hex[:12]}"
    listed = {id(d) for diffs in per_database(report).values() for d in diffs}
    out.unmapped = sum(1 for d in report.diffs if id(d) not in listed)
    for db, diffs in per_database(report).items():
        client = connect(db)
        try:
            keys = list(dict.fromkeys(d.key for d in diffs))
            cls = ClusterStateReader if is_cluster(client) else StateReader
            reader = cls(source=client, info=server_info(client), writer=writer, codec=Codec(),
                         type_filter=key_filter.type)
            reader.capture_id = capture_id
            for i in range(0, len(keys), BATCH):
                reader.read(keys[i:i + BATCH], check_type=True)
            out.events += reader.seq
            out.keys += len(keys)
            for d in diffs:
                out.by_kind[d.kind] = out.by_kind.get(d.kind, 0) + 1
        finally:
            client.close()
    writer.flush()
    return out


def queued_line(q: Queued, log_masked: str) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(q.by_kind.items()))
    return (f"verify: repair queued {counted(q.keys, 'key')} ({kinds}) as "
            f"{counted(q.events, 'event')} on {log_masked}: an apply of that "
            "log writes them; verify again once it has"
            + (f"; {q.unmapped} keys only in a merged target database were not queued (no "
               "source database to read them from)" if q.unmapped else ""))
