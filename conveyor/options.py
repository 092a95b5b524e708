"""What a command was asked to do, as the CLI parsed it (conveyor/cli.py): the command functions
(conveyor/commands.py) run it and conveyor/wiring.py builds the processes from it."""
from __future__ import annotations

from dataclasses import dataclass, field

from conveyor.endpoints import mask_uri
from conveyor.keys import KeyFilter, KeyRewriter
from conveyor.kept import KeptKeys
from conveyor.log import StartAt


@dataclass
class LogSpec:
    """The log: its URI and the backend settings passed through (``--log-opt KEY=VALUE``)."""
    uri: str
    opts: dict[str, str] = field(default_factory=dict)
    wait_s: float = 30.0           # --log-wait: a log unavailable at start is waited this long

    @property
    def masked(self) -> str:
        return mask_uri(self.uri)


@dataclass
class CaptureOptions:
    key_filter: KeyFilter = field(default_factory=KeyFilter)
    mode: str = "snapshot"
    scan_count: int = 1000
    fresh: bool = False
    read_from: str = "primary"       # cluster source: scan and read the primaries or replicas
    nodes: tuple[str, ...] = ()      # cluster source: only the slots of these primaries
    idle_timeout: float | None = None
    enable_notifications: bool = False
    max_dirty_keys: int = 1_000_000
    value_type: str = "dump"
    big_key_bytes: int | None = 8 * 1024 * 1024
    mem_limit: int | None = None
    mem_limit_skip: bool = False
    dbs: list[int] | None = None         # --db, resolved: the source databases to capture
    state_dir: str = ".conveyor"         # live modes keep their key ledgers under it
    max_rate: float | None = None        # --max-rate: source keys read per second (scans)
    max_bytes_rate: int | None = None    # --max-bytes-rate: bytes read per second (scans)


@dataclass
class DbOptions:
    """--db (as given: None, "all" or numbers), --target-db and --allow-collisions."""
    dbs: list[int] | str | None = None
    target_db: int | None = None
    allow_collisions: bool = False
    resolved: list[int] | None = None    # --db resolved against the source, once per command


@dataclass
class ApplyOptions:
    rewriter: KeyRewriter = field(default_factory=KeyRewriter)
    group: str = "apply"
    start: StartAt = "committed"
    idle_timeout: float | None = None
    batch: int = 2000
    dry_run: bool = False
    merge_policy: str = "overwrite"
    stream_ids: str = "keep"
    on_existing: str = "overwrite"       # a non-empty target at a group's first apply: skip, fail


@dataclass
class VerifyOptions:
    key_filter: KeyFilter = field(default_factory=KeyFilter)
    rewriter: KeyRewriter = field(default_factory=KeyRewriter)
    ttl_tolerance_ms: int = 1000
    recheck_delay: float = 1.0
    scan_count: int = 1000
    stream_ids: str = "keep"
    show_diffs: bool = False
    report_path: str | None = None
    max_rate: float | None = None        # --max-rate: keys compared per second
    max_bytes_rate: int | None = None    # --max-bytes-rate: value bytes read per second
    sample: int | None = None            # --sample: compare this many random source keys
    kept: KeptKeys | None = None         # replicate --on-existing skip: keys left alone


@dataclass
class ReplicateOptions:
    capture: CaptureOptions
    apply: ApplyOptions
    verify: VerifyOptions | None = None  # None: no verify pass after the copy
