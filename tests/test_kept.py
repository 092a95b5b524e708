"""--on-existing skip's stored key names (conveyor/kept.py): pure logic, no server."""
import pytest

from conveyor.errors import ConfigError
from conveyor.kept import CHUNK, KeptKeys, digest, index_name
from conveyor.log.base import MetaStore


class DictMeta(MetaStore):
    def __init__(self):
        self.docs = {}

    def put(self, name, doc):
        self.docs[name] = doc

    def get(self, name):
        return self.docs.get(name)

    def documents(self):
        return dict(self.docs)

    def close(self):
        pass


def test_kept_names_survive_a_round_trip_over_several_documents():
    names = [b"k:%d" % i for i in range(CHUNK * 2 + 5)]
    kept = KeptKeys(digest(3, n) for n in names)
    meta = DictMeta()
    kept.save(meta, "g")
    assert meta.docs[index_name("g")] == {"keys": len(names), "chunks": 3}
    back = KeptKeys.load(meta.documents(), "g")
    assert len(back) == len(names)
    assert all(back.holds(3, n) for n in names)
    # the database is part of the name: the same key of another database is not kept
    assert not back.holds(0, b"k:1") and not back.holds(3, b"k:-1")
    assert KeptKeys.load(meta.documents(), "other") is None


def test_a_lost_part_of_the_kept_names_is_an_error_not_an_empty_set():
    meta = DictMeta()
    KeptKeys(digest(0, b"%d" % i) for i in range(CHUNK + 1)).save(meta, "g")
    del meta.docs["kept-g:1"]
    with pytest.raises(ConfigError, match="lost part 1"):
        KeptKeys.load(meta.documents(), "g")
