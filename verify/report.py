"""What verify found: the differences, each of one key, and the counts its lines report."""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

from conveyor.words import counted

KINDS = ("missing", "type", "value", "ttl", "extra")


@dataclass
class Diff:
    kind: str
    key: bytes
    target_key: bytes
    detail: str = ""


def _show(key: bytes):
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(key).decode()}


@dataclass
class VerifyReport:
    checked: int = 0
    diffs: list[Diff] = field(default_factory=list)
    complete: bool = False
    evicted: int = 0             # keys the source evicted (maxmemory) while verify read it
    sampled_of: int | None = None    # --sample: the source's keys the sample was drawn from
    kept: int = 0                # differing keys the target held before (--on-existing skip)

    @property
    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(KINDS, 0)
        for d in self.diffs:
            c[d.kind] += 1
        return c

    @property
    def differs(self) -> bool:
        return bool(self.diffs)

    def summary_line(self) -> str:
        c = self.counts
        line = (f"{c['missing']} missing, {c['type']} type, {c['value']} value, {c['ttl']} ttl, "
                f"{c['extra']} extra ({counted(self.checked, 'key')} checked)")
        if self.sampled_of is not None:
            of = f"{self.sampled_of:,} key{'' if self.sampled_of == 1 else 's'}"
            line += (f"; a random sample of the source's {of}, not a full "
                     "verify: other keys, and keys only the target holds, were not compared")
        if self.kept:
            line += (f"; {counted(self.kept, 'key')} the target held before, left alone "
                     "(--on-existing skip), differ from the source: not counted as differences")
        if self.evicted:
            # A source at its maxmemory evicts keys when clients (verify's own reads too) need
            # memory: such a key is then extra on the target, a change of the source itself.
            line += (f"; the source evicted {counted(self.evicted, 'key')} while verify read it "
                     f"(maxmemory reached): differences may be its own changes")
        return line

    def to_json(self) -> dict:
        return {"checked": self.checked, "complete": self.complete, "counts": self.counts,
                "sample": self.sampled_of is not None, "source_keys": self.sampled_of,
                "source_evicted": self.evicted, "kept": self.kept,
                "summary": self.summary_line(),
                "diffs": [{"kind": d.kind, "key": _show(d.key), "target_key": _show(d.target_key),
                           "detail": d.detail} for d in self.diffs]}
