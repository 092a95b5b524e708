"""Small documents of a Redis Streams log (capture checkpoints, apply status): fields of the hash
``{stream}:meta`` on the buffer Redis."""
from __future__ import annotations

import json

from conveyor.acl import user_of
from conveyor.log.base import MetaStore
from conveyor.log.streams.base import client, converted


class StreamMetaStore(MetaStore):
    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self.r = client(uri, opts)
        self.user = user_of(self.r)
        self.key = f"{opts.get('stream', 'conveyor')}:meta"

    def put(self, name: str, doc: dict) -> None:
        with converted("HSET meta", self.user):
            self.r.hset(self.key, name, json.dumps(doc))

    def get(self, name: str) -> dict | None:
        with converted("HGET meta", self.user):
            v = self.r.hget(self.key, name)
        return json.loads(v) if v is not None else None

    def documents(self) -> dict[str, dict]:
        with converted("HGETALL meta", self.user):
            found = self.r.hgetall(self.key)
        return {k.decode(): json.loads(v) for k, v in found.items()}

    def close(self) -> None:
        self.r.close()
