"""Small documents kept in the file log's directory (capture checkpoints, apply status)."""
from __future__ import annotations

from urllib.parse import unquote

from conveyor.errors import LogError
from conveyor.log.base import MetaStore
from conveyor.log.file.paths import atomic_json, read_json, root_of, safe_name


class FileMetaStore(MetaStore):
    """Documents in PATH/meta, created on the first ``put`` (reading creates nothing)."""

    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self.dir = root_of(uri) / "meta"

    def put(self, name: str, doc: dict) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LogError(f"cannot use log directory {self.dir.parent}: {e}") from e
        atomic_json(self.dir / f"{safe_name(name)}.json", doc)

    def get(self, name: str) -> dict | None:
        return read_json(self.dir / f"{safe_name(name)}.json")

    def documents(self) -> dict[str, dict]:
        if not self.dir.is_dir():
            return {}
        docs = {unquote(p.stem): read_json(p) for p in sorted(self.dir.glob("*.json"))}
        return {name: doc for name, doc in docs.items() if doc is not None}
