"""The key ledger and the read pacer: pure logic on real files, no server."""
from __future__ import annotations

import os
import time

from conveyor.capture.ledger import DELETES_KEPT_S, Ledger
from conveyor.capture.ledger_files import crcs_of, expiries
from conveyor.capture.ledger_rebuild import rebuild
from conveyor.capture.rescan import Rescan
from conveyor.events import Codec, Event, Kind
from conveyor.log.base import History
from conveyor.rate import Pacer

State = dict[bytes, tuple[bytes, "int | None"]]


def _payload(value: bytes) -> bytes:
    # A DUMP payload ends in its RDB version and CRC-64: the ledger takes the last 8 bytes.
    return b"\x00" + value + b"\x0b\x00" + value[-8:].rjust(8, b"\x00")


def _log(ledger: Ledger, state: State, seq: int) -> None:
    """A capture appending these states, then flushing the log."""
    keys = list(state)
    ledger.logged(keys, crcs_of([_payload(state[k][0]) for k in keys]),
                  expiries([state[k][1] for k in keys]))
    ledger.write_ahead()
    ledger.commit("cap-1", seq)


def _rescan(ledger: Ledger, state: State, in_scope=None) -> list[bytes]:
    """What a rescan reads again: digests first, then the keys that differ or vanished."""
    rescan = Rescan(ledger)
    keys = list(state)
    for i in range(0, len(keys), 700):
        part = keys[i:i + 700]
        rescan.saw(part, crcs_of([_payload(state[k][0]) for k in part]),
                   expiries([state[k][1] for k in part]))
    return sorted(k for page in rescan.to_read(in_scope) for k in page)


def _first_scan(tmp_path, n: int = 3000) -> tuple[Ledger, State]:
    ledger = Ledger(tmp_path / "ledger")
    ledger.reset("log-a")
    state = {b"k:%d" % i: (b"value-%08d" % i, None if i % 3 else 1_900_000_000_000 + i)
             for i in range(n)}
    _log(ledger, state, n)
    return ledger, state


def test_a_rescan_reads_again_only_what_changed_or_vanished(tmp_path):
    # given a ledger that saw a first scan of 3000 keys
    ledger, state = _first_scan(tmp_path)
    assert len(ledger) == 3000
    # when, while changes were not seen, values and expiries change, keys go and come
    state[b"k:10"] = (b"changed-value", None)
    state[b"k:11"] = (state[b"k:11"][0], 1_950_000_000_000)
    del state[b"k:12"], state[b"k:2000"]
    state[b"new"] = (b"fresh", None)
    # then the rescan reads again exactly those keys
    assert _rescan(ledger, state) == [b"k:10", b"k:11", b"k:12", b"k:2000", b"new"]
    # and once they are logged (the deletes as deletes), a second rescan reads nothing
    ledger.deleted([b"k:12", b"k:2000"])
    _log(ledger, {k: state[k] for k in (b"k:10", b"k:11", b"new")}, 3010)
    assert len(ledger) == len(state)
    assert _rescan(ledger, state) == []


def test_unknown_states_are_always_read_again(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    ledger.reset("log-a")
    ledger.logged([b"typed"])                       # no digest: a typed value or a big key
    ledger.commit("cap-1", 1)
    assert _rescan(ledger, {b"typed": (b"x", None)}) == [b"typed"]


def test_entries_after_the_last_commit_keep_their_names_not_their_digests(tmp_path):
    # given a capture killed after appending (a, b) but before the flush of b was committed
    ledger, state = _first_scan(tmp_path, 10)
    ledger.logged([b"late"], crcs_of([_payload(b"v")]), expiries([None]))
    ledger.write_ahead()                            # handed to the OS before the log append
    ledger._journal.close()                         # killed: no commit, no clean close
    # when it restarts, the ledger is trusted as far as the checkpoint it committed
    again = Ledger(tmp_path / "ledger")
    assert again.check("log-a", "cap-1", 10).trusted
    # then the late key is still known (a later delete is found), its state is read again
    assert _rescan(again, {**state, b"late": (b"v", None)}) == [b"late"]
    assert _rescan(again, state) == [b"late"]       # gone from the source: read, then deleted


def test_trust_follows_the_log_the_checkpoint_and_a_clean_close(tmp_path):
    path = tmp_path / "ledger"
    ledger = Ledger(path)
    assert "no ledger" in ledger.check("log-a", None, None).why
    ledger.reset("log-a")
    _log(ledger, {b"a": (b"1", None)}, 5)
    ledger.close()

    again = Ledger(path)
    assert again.check("log-a", "cap-1", 5).trusted
    assert again.check("log-a", "cap-1", 4).trusted             # the ledger may be ahead
    assert "behind" in again.check("log-a", "cap-1", 6).why      # commits lost: rebuild
    assert "another log" in again.check("log-b", "cap-1", 5).why
    assert not again.check("log-a", "cap-2", 5).trusted
    again.close(clean=False)
    meta = (path / "meta.json").read_text().replace(again.meta["boot_id"], "another-boot")
    (path / "meta.json").write_text(meta)
    assert "machine restarted" in Ledger(path).check("log-a", "cap-1", 5).why


def test_a_torn_journal_tail_is_cut(tmp_path):
    ledger, state = _first_scan(tmp_path, 50)
    ledger.close(clean=False)
    with open(tmp_path / "ledger" / "journal", "ab") as f:
        f.write(b"B\x05\x00\x00\x00garbage")        # a record a kill tore
    again = Ledger(tmp_path / "ledger")
    assert again.check("log-a", "cap-1", 50).trusted
    assert _rescan(again, state) == []


def test_a_rescan_of_some_slots_reads_the_unseen_keys_of_those_only(tmp_path):
    ledger, state = _first_scan(tmp_path, 100)
    kept = {k: v for k, v in state.items() if k.endswith(b"7")}
    wanted = [k for k in state if k not in kept and k.endswith(b"1")]
    assert _rescan(ledger, kept, in_scope=lambda k: k.endswith(b"1")) == sorted(wanted)


def test_generations_tell_where_each_key_was_logged_last(tmp_path):
    ledger, state = _first_scan(tmp_path, 100)
    ledger.new_generation(1000)
    _log(ledger, {b"k:1": (b"new", None), b"k:2": (b"new", None)}, 200)
    assert ledger.census() == {0: 98, 1: 2}
    assert sorted(k for p in ledger.keys_of({1}) for k in p) == [b"k:1", b"k:2"]


def test_a_lost_ledger_is_rebuilt_from_what_the_log_holds(tmp_path):
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
    ledger = Ledger(tmp_path / "ledger")
    ledger.reset("log-a")
    found = rebuild(ledger, history, codec, 0, lambda k: not k.startswith(b"skip:"))
    assert (found.records, found.keys, found.gap) == (8, 2, "")
    # the source as the log says it is: nothing to read again; a changed key is read
    state = {b"a": (b"v1-new", None), b"b": (b"v2", 1_900_000_000_000)}
    assert _rescan(ledger, state) == []
    state[b"b"] = (b"v2-changed", None)
    assert _rescan(ledger, state) == [b"b"]


def test_a_lost_log_turns_every_delete_the_ledger_remembers_into_a_delete_again(tmp_path):
    # given a capture that logged 100 keys, then the deletes of two of them: one merged into its
    # bucket's base by a rescan since, one still in the journal
    ledger, state = _first_scan(tmp_path, 100)
    ledger.deleted([b"k:1"])
    ledger.commit("cap-1", 101)
    del state[b"k:1"]
    assert _rescan(ledger, state) == []             # merged; a delete is not read again
    ledger.deleted([b"k:2"])
    ledger.commit("cap-1", 102)
    del state[b"k:2"]
    assert len(ledger) == 98 and _rescan(ledger, state) == []
    # when the log is lost: apply may not have applied those deletes, the target may hold both
    ledger.forget_digests("log-b")
    # then the resync reads every key again, the deleted ones too (absent: logged as deletes)
    assert _rescan(ledger, state) == sorted([*state, b"k:1", b"k:2"])
    assert ledger.deletes_forgotten_ms == 0 and ledger.forgotten_deletes() == ""


def test_deletes_older_than_the_horizon_are_forgotten_and_said(tmp_path):
    ledger, state = _first_scan(tmp_path, 10)
    now = int(time.time() * 1000)
    ledger.deleted([b"k:1"], at_ms=now - DELETES_KEPT_S * 1000 - 60_000)
    ledger.deleted([b"k:2"], at_ms=now - 60_000)
    ledger.commit("cap-1", 11)
    del state[b"k:1"], state[b"k:2"]
    assert _rescan(ledger, state) == []             # the merge drops the old delete only
    assert ledger.deletes_forgotten_ms == now - DELETES_KEPT_S * 1000 - 60_000
    ledger.forget_digests("log-b")
    assert _rescan(ledger, state) == sorted([*state, b"k:2"])
    assert "no longer remembers deletes logged before" in ledger.forgotten_deletes()
    ledger.close()
    assert Ledger(tmp_path / "ledger").deletes_forgotten_ms == ledger.deletes_forgotten_ms


def test_memory_stays_one_bucket_whatever_the_keys(tmp_path):
    # 200k keys in 512 buckets: a rescan holds one bucket (~400 keys) at a time, not 200k
    ledger, state = _first_scan(tmp_path, 200_000)
    sizes = [len(s) for _, s in ledger.buckets_merged()]
    assert sum(sizes) == 200_000 and max(sizes) < 2_000
    assert os.path.getsize(tmp_path / "ledger" / "journal") == 0     # distributed


def test_the_pacer_holds_the_average_rate():
    now = [0.0]
    pacer = Pacer(keys_per_s=1000, bytes_per_s=10_000, clock=lambda: now[0])
    assert pacer.batch_for(1000) == 100
    for _ in range(11):
        pacer.charge(keys=100)
    assert 0.9 <= pacer.delay() <= 1.1            # 1100 keys at 1000/s, a tenth of a second credit
    now[0] += 5
    assert pacer.delay() == 0
    pacer.charge(keys=1, nbytes=50_000)             # big values: the byte rate decides
    assert 4.8 <= pacer.delay() <= 5.0
    assert not Pacer().limited and Pacer().delay() == 0 and Pacer().batch_for(7) == 7
