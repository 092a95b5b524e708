"""The key ledger and the read pacer: pure logic on a real SQLite file, no server."""
from __future__ import annotations

from capture.ledger import Ledger, crcs_of, expiries
from conveyor.rate import Pacer


def _payload(value: bytes) -> bytes:
    # A DUMP payload ends in its RDB version and CRC-64: the ledger takes the last 8 bytes.
    return b"\x00" + value + b"\x0b\x00" + value[-8:].rjust(8, b"\x00")


def _log(ledger: Ledger, state: dict[bytes, tuple[bytes, int | None]]) -> None:
    keys = list(state)
    ledger.logged(keys, crcs_of([_payload(state[k][0]) for k in keys]),
                  expiries([state[k][1] for k in keys]))


def _scan(ledger: Ledger, state: dict[bytes, tuple[bytes, int | None]]) -> list[bytes]:
    """What a rescan logs: the keys whose state differs from the ledger's."""
    keys = list(state)
    same = ledger.unchanged(keys, crcs_of([_payload(state[k][0]) for k in keys]),
                            expiries([state[k][1] for k in keys]))
    changed = [k for k in keys if k not in same]
    _log(ledger, {k: state[k] for k in changed})
    return changed


def test_a_rescan_logs_changed_keys_and_finds_the_deleted_ones(tmp_path):
    # given a ledger that saw a first scan of 3000 keys
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.reset("log-a")
    ledger.new_epoch()
    state = {b"k:%d" % i: (b"value-%08d" % i, None if i % 3 else 1_900_000_000_000 + i)
             for i in range(3000)}
    _log(ledger, state)
    ledger.commit("cap-1", 3001)
    # when values change, expiries change, keys are deleted and created while nothing was seen
    state[b"k:10"] = (b"changed-value", None)
    state[b"k:11"] = (state[b"k:11"][0], 1_950_000_000_000)
    del state[b"k:12"], state[b"k:2000"]
    state[b"new"] = (b"fresh", None)
    epoch = ledger.new_epoch()
    changed = _scan(ledger, state)
    unseen = [k for page in ledger.unseen(epoch) for k in page]
    # then only what changed is logged again, and the deleted keys are the unseen ones
    assert sorted(changed) == [b"k:10", b"k:11", b"new"]
    assert sorted(unseen) == [b"k:12", b"k:2000"]
    ledger.deleted(unseen)
    ledger.commit("cap-1", 3010)
    assert len(ledger) == len(state)
    # and a second rescan with nothing changed logs nothing and finds nothing deleted
    epoch = ledger.new_epoch()
    assert _scan(ledger, state) == []
    assert [k for page in ledger.unseen(epoch) for k in page] == []


def test_unknown_states_are_always_logged_again(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.reset("log-a")
    ledger.new_epoch()
    ledger.logged([b"typed"])                       # no digest: a typed value or a big key
    ledger.commit("cap-1", 1)
    ledger.new_epoch()
    zero = bytes(8)                                 # even a digest of zeros is not "the same"
    assert ledger.unchanged([b"typed"], zero, zero) == set()


def test_only_committed_changes_survive_and_trust_follows_the_checkpoint(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    assert not ledger.check("log-a", None, None).trusted
    ledger.reset("log-a")
    ledger.new_epoch()
    _log(ledger, {b"a": (b"1", None)})
    ledger.commit("cap-1", 5)
    _log(ledger, {b"b": (b"2", None)})              # appended, never flushed: not committed
    ledger.close()

    again = Ledger(path)
    assert len(again) == 1
    assert again.check("log-a", "cap-1", 5).trusted
    assert again.check("log-a", "cap-1", 4).trusted          # the ledger may be ahead
    assert "behind" in again.check("log-a", "cap-1", 6).why   # commits lost: rebuild
    assert "another log" in again.check("log-b", "cap-1", 5).why
    assert not again.check("log-a", "cap-2", 5).trusted
    again.reset("log-b")
    assert len(again) == 0 and again.log_id == "log-b"


def test_unseen_keys_of_some_slots_only(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.reset("log-a")
    ledger.new_epoch()
    keys = [b"a", b"b", b"c"]
    ledger.logged(keys, crcs_of([_payload(b"x")] * 3), expiries([None] * 3), slots=[1, 2, 3])
    epoch = ledger.new_epoch()
    assert [k for p in ledger.unseen(epoch, slots={2, 3}) for k in p] == [b"b", b"c"]


def test_the_pacer_holds_the_average_rate():
    now = [0.0]
    pacer = Pacer(keys_per_s=1000, bytes_per_s=10_000, clock=lambda: now[0])
    assert pacer.batch_for(1000) == 100
    pacer.charge(keys=100)
    assert abs(pacer.delay() - 0.0) < 1e-9 or pacer.delay() <= 0.1   # a tenth of a second credit
    for _ in range(10):
        pacer.charge(keys=100)
    assert 0.9 <= pacer.delay() <= 1.1
    now[0] += 5
    assert pacer.delay() == 0
    pacer.charge(keys=1, nbytes=50_000)             # big values: the byte rate decides
    assert 4.8 <= pacer.delay() <= 5.0
    assert not Pacer().limited and Pacer().delay() == 0 and Pacer().batch_for(7) == 7


def test_a_lost_ledger_is_rebuilt_from_what_the_log_holds(tmp_path):
    from capture.ledger import rebuild
    from conveyor.events import Codec, Event, Kind
    from conveyor.log.base import History

    codec = Codec()
    events = [Event(Kind.SNAPSHOT_BEGIN, 0, capture_id="c", seq=1),
              Event(Kind.UPSERT, 0, b"a", _payload(b"v1"), None, 1, "c", 2),
              Event(Kind.UPSERT, 0, b"b", _payload(b"v2"), 1_900_000_000_000, 1, "c", 3),
              Event(Kind.UPSERT, 1, b"other-db", _payload(b"v3"), None, 1, "c", 4),
              Event(Kind.UPSERT, 0, b"skip:me", _payload(b"v4"), None, 1, "c", 5),
              Event(Kind.UPSERT, 0, b"gone", _payload(b"v5"), None, 1, "c", 6),
              Event(Kind.DELETE, 0, b"gone", None, None, 1, "c", 7),
              Event(Kind.UPSERT, 0, b"a", _payload(b"v1-new"), None, 1, "c", 8)]
    history = History(True, iter([(e.record_key(), codec.encode(e)) for e in events]))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.reset("log-a")
    found = rebuild(ledger, history, codec, 0, lambda k: not k.startswith(b"skip:"))
    assert (found.records, found.keys, found.gap) == (8, 2, "")
    # the source as the log says it is: nothing to log again; a changed key is logged
    epoch = ledger.new_epoch()
    state = {b"a": (b"v1-new", None), b"b": (b"v2", 1_900_000_000_000)}
    assert _scan(ledger, state) == []
    assert [k for p in ledger.unseen(epoch) for k in p] == []
    state[b"b"] = (b"v2-changed", None)
    assert _scan(ledger, state) == [b"b"]
