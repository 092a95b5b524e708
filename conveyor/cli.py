"""The ``conveyor`` command line (contract in DESIGN.md: scripts and tests depend on it): options
parsed into the dataclasses of conveyor/options.py, handed to the command functions.

Each command imports conveyor.commands when it runs: ``--help`` and usage errors do not load the
processes and their drivers."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import re
import sys
from datetime import datetime
from pathlib import Path

import click

from conveyor.endpoints import Tls, mask_text, mask_uri
from conveyor.errors import ConfigError, ConveyorError
from conveyor.keys import REDIS_TYPES, KeyFilter, KeyRewriter, parse_slots
from conveyor.options import (ApplyOptions, CaptureOptions, DbOptions, LogSpec, ReplicateOptions,
                              VerifyOptions)
from conveyor.progress import LOG_FORMATS, fatal, setup_logging
from conveyor.runner import Endpoint

log = logging.getLogger("conveyor")


class Cli(click.Group):
    """Turns every ConveyorError into one line on stderr and its exit code; never a traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConveyorError as e:
            fatal(f"conveyor: error: {mask_text(str(e))}", e.exit_code)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            fatal("conveyor: interrupted", 130)
            ctx.exit(130)
        except BrokenPipeError:
            _closed_pipe()
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - a bug, but still one line (details with -v)
            if os.environ.get("CONVEYOR_DEBUG"):
                raise
            log.debug("internal error", exc_info=True)
            fatal(f"conveyor: internal error: {type(e).__name__}: {mask_text(str(e))} "
                  "(set CONVEYOR_DEBUG=1 for a traceback)", 70)
            ctx.exit(70)


GLOBAL_FLAGS = ("-v", "-vv", "-vvv", "--verbose")


def hoist_global_options(args: list[str]) -> list[str]:
    """``-v`` and ``--log-format`` are the group's, but users put them anywhere (``conveyor
    verify … -v``): those after the command name move before it (never past a ``--``)."""
    args = list(args)
    first, i = None, 0
    while i < len(args):  # the command name: the first word that is no option's value
        if args[i] == "--log-format":
            i += 2
            continue
        if not args[i].startswith("-"):
            first = i
            break
        i += 1
    if first is None:
        return args
    moved, rest, i = [], args[:first + 1], first + 1
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i:]
            break
        if a in GLOBAL_FLAGS:
            moved.append(a)
        elif a == "--log-format" and i + 1 < len(args):
            moved += [a, args[i + 1]]
            i += 1
        elif a.startswith("--log-format="):
            moved.append(a)
        else:
            rest.append(a)
        i += 1
    return args[:first] + moved + rest[first:]


# -- shared options ------------------------------------------------------------------------------
def _options(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


def _endpoint_options(side: str):
    env = side.upper()
    return _options(
        click.option(f"--{side}-user", envvar=f"CONVEYOR_{env}_USER",
                     help=f"ACL user for the {side} (or in the URI)."),
        click.option(f"--{side}-password", envvar=f"CONVEYOR_{env}_PASSWORD",
                     help=f"Password for the {side}; prefer the env var CONVEYOR_{env}_PASSWORD."),
        click.option(f"--{side}-password-file", metavar="PATH", envvar=f"CONVEYOR_{env}_PASSWORD_FILE",
                     type=click.Path(exists=True, dir_okay=False),
                     help=f"Read the {side}'s password from this file (a mounted secret)."),
        click.option(f"--{side}-cacert", metavar="PATH", envvar=f"CONVEYOR_{env}_CACERT",
                     help=f"CA certificate(s) that signed the {side}'s TLS certificate "
                          "(rediss://; default: the system's CAs)."),
        click.option(f"--{side}-cert", metavar="PATH", envvar=f"CONVEYOR_{env}_CERT",
                     help=f"Client certificate for the {side} (mutual TLS), with --{side}-key."),
        click.option(f"--{side}-key", metavar="PATH", envvar=f"CONVEYOR_{env}_KEY",
                     help=f"Private key of --{side}-cert."),
        click.option(f"--{side}-cluster", is_flag=True,
                     help=f"The {side} is a Redis Cluster (default: detected with INFO cluster "
                          "on the node the URI names)."),
        click.option(f"--{side}-insecure", is_flag=True,
                     help=f"Accept the {side}'s TLS certificate without verifying it or its host "
                          "name (encrypted, but not authenticated)."),
    )


filter_options = _options(
    click.option("--scan-match", metavar="GLOB", help="Only keys matching this glob (SCAN MATCH)."),
    click.option("--scan-type", type=click.Choice(REDIS_TYPES), help="Only keys of this type."),
    click.option("--scan-count", type=click.IntRange(1, 100_000), default=1000, show_default=True,
                 help="SCAN COUNT hint, also the read batch size."),
    click.option("--key-include", multiple=True, metavar="REGEX",
                 help="Only keys matching a regex (repeatable: any)."),
    click.option("--key-exclude", multiple=True, metavar="REGEX",
                 help="Skip keys matching a regex (repeatable)."),
    click.option("--key-slots", multiple=True, metavar="RANGES",
                 help="Only keys in these hash slots, e.g. 0-8000 (repeatable)."),
)

rewrite_options = _options(
    click.option("--key-prefix", default="", metavar="PREFIX",
                 help="Prepend PREFIX to every key written to the target."),
    click.option("--key-replace", nargs=2, multiple=True, metavar="REGEX REPLACEMENT",
                 help="Rewrite target key names with a regex substitution (repeatable, in order)."),
)

log_options = _options(
    click.option("--log-opt", "log_opts", multiple=True, metavar="KEY=VALUE",
                 help="Backend setting passed through (librdkafka property, stream=, partitions=...)."),
)

log_wait_option = click.option(
    "--log-wait", type=click.FloatRange(0), default=30.0, show_default=True, metavar="SECONDS",
    envvar="CONVEYOR_LOG_WAIT",
    help="A log that cannot be reached at start is waited for this long, then it is an error "
         "(0: wait for as long as it takes). Once running, an unreachable log is always waited for.")

live_options = _options(
    click.option("--idle-timeout", type=click.FloatRange(0), metavar="SECONDS",
                 help="Live modes: end after this long without a change (default: until SIGINT/SIGTERM)."),
    click.option("--max-dirty-keys", type=click.IntRange(1), default=1_000_000, show_default=True,
                 help="Live modes: changed keys waiting to be read; beyond it they are dropped "
                      "and a resync (catch-up scan) heals the gap, counted and reported."),
    click.option("--enable-notifications", is_flag=True,
                 help="Live modes: CONFIG SET notify-keyspace-events on the source when it lacks "
                      "what capture needs (otherwise capture stops and says what to set)."),
)


class ByteSize(click.ParamType):
    """A size in bytes: 1048576, 512KiB, 64MB, 1GiB (K/M/G are powers of 1024)."""

    name = "size"
    _units = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
              "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m and self._units.get(m.group(2).lower())
        if not m or unit is None:
            self.fail(f"{value!r} is not a size (examples: 1048576, 512KiB, 64MB)", param, ctx)
        return int(float(m.group(1)) * unit)


rate_options = _options(
    click.option("--max-rate", type=click.FloatRange(0, min_open=True), metavar="KEYS_PER_SECOND",
                 help="Read at most this many keys a second from the source in scans, rescans "
                      "and their catch-ups (reads of changed keys are never held back; default: "
                      "no limit)."),
    click.option("--max-bytes-rate", type=ByteSize(), metavar="SIZE",
                 help="Read at most this many bytes a second from the source in scans, big-key "
                      "pages included (e.g. 20MiB; default: no limit)."),
)

type_options = _options(
    click.option("--type", "value_type", type=click.Choice(["dump", "struct"]), default="dump",
                 show_default=True, help="dump: DUMP/RESTORE payloads (converted to type-based writes "
                 "when the target refuses them); struct: typed reads and type-based writes."),
    click.option("--big-key-bytes", type=ByteSize(), default="8MiB", show_default=True,
                 help="Keys whose MEMORY USAGE is above this are read and written in parts "
                      "(0: never; then no MEMORY USAGE is asked)."),
    click.option("--mem-limit", type=ByteSize(), metavar="SIZE",
                 help="Report keys whose MEMORY USAGE is above SIZE (named in the output)."),
    click.option("--mem-limit-skip", is_flag=True,
                 help="With --mem-limit: do not migrate those keys (counted and named)."),
)

write_options = _options(
    click.option("--merge-policy", type=click.Choice(["overwrite", "merge"]), default="overwrite",
                 show_default=True, help="overwrite: the target key is replaced atomically; merge: "
                 "collections are merged into what the target key holds."),
    click.option("--stream-id", "stream_ids", type=click.Choice(["keep", "drop"]), default="keep",
                 show_default=True, help="Type-based stream writes: keep the entry ids, or let the "
                 "target assign new ones."),
    click.option("--on-existing", type=click.Choice(["overwrite", "skip", "fail"]),
                 default="overwrite", show_default=True,
                 help="A target that already holds keys when a group first applies: overwrite "
                      "(said in a warning: keys of the same name are replaced), skip (those keys "
                      "are never written or deleted by this group; their names are kept in the "
                      "log's metadata) or fail (exit 1, nothing written)."),
)


def _db_spec(ctx, param, value):
    from conveyor.databases import parse_dbs
    try:
        return parse_dbs(value)
    except ConveyorError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None


db_option = click.option(
    "--db", "db_spec", metavar="all|N,M", callback=_db_spec,
    help="Source databases (standalone source): 'all' (every configured one, CONFIG GET "
         "databases) or a list such as 0,3,5; each event carries its db. Default: the source "
         "URI's database (/N), else 0.")
target_db_option = click.option(
    "--target-db", type=click.IntRange(0), metavar="N",
    help="Write every source database into target database N (default: each into the same "
         "number). Needed for a Redis Cluster target (0) when the source has other databases.")
collisions_option = click.option(
    "--allow-collisions", is_flag=True,
    help="With --target-db: the same key name in several source databases (the last write "
         "wins) is reported but does not make the run fail.")


def _db_opts(source: str | None, target: str | None, kw) -> DbOptions:
    """--db / --target-db / --allow-collisions; a database named both in a URI and by an
    option is refused."""
    from conveyor.databases import refuse_uri_and_option
    from conveyor.endpoints import uri_db

    spec, target_db = kw.get("db_spec"), kw.get("target_db")
    if source is not None:
        refuse_uri_and_option(uri_db(source), "--db", spec)
    if target is not None:
        refuse_uri_and_option(uri_db(target), "--target-db", target_db)
    if kw.get("allow_collisions") and target_db is None:
        raise click.UsageError("--allow-collisions applies with --target-db N (several source "
                               "databases into one)")
    return DbOptions(dbs=spec, target_db=target_db,
                     allow_collisions=bool(kw.get("allow_collisions")))


def _apply_opts(kw, rewriter: KeyRewriter, **given) -> ApplyOptions:
    """``given``: what the command itself names (group, start, dry_run, ...)."""
    return ApplyOptions(rewriter=rewriter, merge_policy=kw["merge_policy"],
                        stream_ids=kw["stream_ids"], on_existing=kw["on_existing"], **given)


def _capture_opts(mode, fresh, kw, key_filter: KeyFilter, state_dir: str) -> CaptureOptions:
    if kw.get("idle_timeout") is not None and mode == "snapshot":
        raise click.UsageError("--idle-timeout applies to --mode live and liveonly")
    if kw["mem_limit_skip"] and not kw["mem_limit"]:
        raise click.UsageError("--mem-limit-skip needs --mem-limit SIZE")
    return CaptureOptions(key_filter=key_filter, mode=mode, scan_count=kw["scan_count"],
                          fresh=fresh, idle_timeout=kw.get("idle_timeout"),
                          enable_notifications=kw.get("enable_notifications", False),
                          max_dirty_keys=kw.get("max_dirty_keys") or 1_000_000,
                          value_type=kw["value_type"], big_key_bytes=kw["big_key_bytes"] or None,
                          mem_limit=kw["mem_limit"], mem_limit_skip=kw["mem_limit_skip"],
                          read_from=kw.get("read_from") or "primary",
                          nodes=tuple(kw.get("node") or ()), state_dir=state_dir,
                          **_rates(kw))


cluster_capture_options = _options(
    click.option("--read-from", type=click.Choice(["primary", "replica"]), default="primary",
                 show_default=True, help="Cluster source: scan and read each shard's primary, or "
                 "a replica of it (sparing primaries; a shard without one is read from its "
                 "primary, with a warning). Changed keys are always read from primaries."),
    click.option("--node", multiple=True, metavar="HOST:PORT",
                 help="Cluster source: capture only the slots these primaries serve (repeatable; "
                      "one capture per primary scales out, each with its own checkpoint)."),
)


metrics_options = _options(
    click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="PORT",
                 help="Serve Prometheus /metrics, /healthz and /readyz on this port."),
    click.option("--ready-lag", type=click.IntRange(0), default=100, show_default=True,
                 metavar="RECORDS", help="/readyz is ready once the log lag is at most this."),
)


def _metrics(kw):
    """The metrics server of --metrics-port, started now (None without the option)."""
    if kw.get("metrics_port") is None:
        return None
    from conveyor.metrics import Metrics
    m = Metrics(ready_lag=kw["ready_lag"])
    m.serve(kw["metrics_port"])
    return m


progress_option = click.option("--progress/--no-progress", default=None,
                               help="Progress on stderr (default: bars on a terminal, otherwise a "
                                    "line every few seconds; --no-progress: none).")


def _filter(kw) -> KeyFilter:
    return KeyFilter(match=kw["scan_match"], type=kw["scan_type"], include=list(kw["key_include"]),
                     exclude=list(kw["key_exclude"]), slots=parse_slots(kw["key_slots"]))


def _rewriter(kw) -> KeyRewriter:
    return KeyRewriter(prefix=kw["key_prefix"], replacements=list(kw["key_replace"]))


def _verify_opts(kw, key_filter: KeyFilter, rewriter: KeyRewriter) -> VerifyOptions:
    return VerifyOptions(key_filter=key_filter, rewriter=rewriter,
                         ttl_tolerance_ms=kw["ttl_tolerance"], recheck_delay=kw["recheck_delay"],
                         scan_count=kw["scan_count"], stream_ids=kw.get("stream_ids") or "keep",
                         show_diffs=bool(kw.get("show_diffs")), report_path=kw.get("report_path"),
                         sample=kw.get("sample"), **_rates(kw))


def _rates(kw) -> dict:
    if kw.get("max_bytes_rate") == 0:
        raise click.BadParameter("must be above 0", param_hint="'--max-bytes-rate'")
    return {"max_rate": kw.get("max_rate"), "max_bytes_rate": kw.get("max_bytes_rate")}


def _log_opts(pairs) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"--log-opt {p!r}: expected KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


def _endpoint(uri: str, side: str, kw) -> Endpoint:
    password = kw.get(f"{side}_password")
    path = kw.get(f"{side}_password_file")
    if path:
        if password:
            raise click.UsageError(f"--{side}-password and --{side}-password-file: give one")
        try:
            password = Path(path).read_text().rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"cannot read --{side}-password-file {path}: {e.strerror}") from e
    tls = Tls(kw.get(f"{side}_cacert"), kw.get(f"{side}_cert"), kw.get(f"{side}_key"),
              bool(kw.get(f"{side}_insecure")))
    return Endpoint(uri, side, kw.get(f"{side}_user"), password, tls,
                    cluster=True if kw.get(f"{side}_cluster") else None)


def _start_at(ctx, param, value: str):
    if value in ("committed", "earliest", "latest"):
        return value
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("use committed, earliest, latest or an ISO-8601 time "
                                 "such as 2026-11-24T10:00:00Z") from None
    t = t if t.tzinfo else t.astimezone()
    now = datetime.now(t.tzinfo)
    if t > now:
        raise click.BadParameter(f"{value} has not come yet (it is now "
                                 f"{now.isoformat(timespec='seconds')}): no record was written "
                                 "after it, so nothing would be applied")
    return t


def _state_log(state_dir: str, source: str, target: str) -> str:
    """The embedded file log of one source -> target pair, inside the state directory."""
    ident = f"{mask_uri(source).split('@')[-1]}->{mask_uri(target).split('@')[-1]}"
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", ident)[:80]
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    return f"file:{Path(state_dir).resolve() / f'{slug}-{digest}'}"


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"],
                                        "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
              envvar="CONVEYOR_LOG_FORMAT",
              help="json: one JSON object per line on stderr (log records and progress reports), "
                   "for log shippers.")
@click.version_option(package_name="conveyor")
def cli(verbose: int, log_format: str) -> None:
    """Migrate Redis data from a source to a target through a durable log."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    setup_logging(level, log_format)


@cli.command(epilog="""
\b
Examples:
  conveyor capture redis://prod:6379 --log file:./migration
  conveyor capture rediss://prod:6380 --mode live --log kafka://broker:9092/migration
  conveyor capture redis://prod:6379 --mode live --max-rate 20000 --log redis://buffer:6379/0
  conveyor capture redis://prod:6379 --log file:./m --scan-match 'user:*' --scan-type hash
""")
@click.argument("source")
@click.option("--log", "log_uri", required=True, metavar="URI", help="The log to append to.")
@click.option("--mode", type=click.Choice(["snapshot", "live", "liveonly"]), default="snapshot",
              show_default=True, help="snapshot: one SCAN pass; live: SCAN + keyspace "
              "notifications; liveonly: notifications only.")
@click.option("--fresh", is_flag=True, help="Start a new snapshot even if an interrupted one can resume.")
@click.option("--state-dir", default=".conveyor", show_default=True, type=click.Path(file_okay=False),
              help="Live modes: where the key ledger lives (what was logged per key, on disk; a "
                   "restart or a gap then costs only what changed).")
@db_option
@live_options
@type_options
@rate_options
@_endpoint_options("source")
@cluster_capture_options
@filter_options
@log_options
@log_wait_option
@metrics_options
@progress_option
def capture(source, log_uri, mode, fresh, state_dir, log_opts, log_wait, progress, **kw):
    """Read SOURCE (SCAN + DUMP, and/or keyspace notifications) and append its keys to the log."""
    from conveyor import commands
    dbopts = _db_opts(source, None, kw)
    src, logspec = _endpoint(source, "source", kw), LogSpec(log_uri, _log_opts(log_opts), log_wait)
    opts = _capture_opts(mode, fresh, kw, _filter(kw), state_dir)
    ok = commands.capture(src, logspec, opts, dbopts, progress=progress, metrics=_metrics(kw))
    sys.exit(0 if ok else 1)


@cli.command("apply", epilog="""
\b
Examples:
  conveyor apply redis://new:6379 --log file:./migration --idle-timeout 10
  conveyor apply redis://cluster-node:7000 --log kafka://broker:9092/migration
  conveyor apply redis://new:6379 --log file:./migration --from earliest --group rebuild
  conveyor apply redis://new:6379 --log file:./migration --dry-run
""")
@click.argument("target")
@click.option("--log", "log_uri", required=True, metavar="URI", help="The log to replay.")
@click.option("--group", default="apply", show_default=True, help="Consumer group (position) name.")
@click.option("--from", "start", default="committed", show_default=True,
              metavar="committed|earliest|latest|ISO-TIME", callback=_start_at,
              help="Where to start replaying.")
@click.option("--idle-timeout", type=click.FloatRange(0), metavar="SECONDS",
              help="End once the log has been drained and idle this long (default: follow forever).")
@click.option("--consumer", metavar="NAME",
              help="This process's member name in the group (default: unique per process). "
                   "Kafka: a name makes the membership static, so a restart takes its partitions "
                   "back at once; never give two live processes the same name.")
@click.option("--batch", type=click.IntRange(1, 100_000), default=2000, show_default=True)
@click.option("--dry-run", is_flag=True, help="Read and decode, write nothing, commit nothing: "
              "counts what apply would write, reading from the group's position (or --from) "
              "on a position of its own; the real group is not moved and sees no new member.")
@target_db_option
@collisions_option
@write_options
@_endpoint_options("target")
@rewrite_options
@log_options
@log_wait_option
@metrics_options
@progress_option
def apply_cmd(target, log_uri, group, start, idle_timeout, consumer, batch, dry_run, log_opts,
              log_wait, progress, **kw):
    """Replay the log into TARGET (RESTORE ... REPLACE ABSTTL, DEL)."""
    from conveyor import commands
    logspec = LogSpec(log_uri, _log_opts(log_opts), log_wait)
    if consumer:
        logspec.opts["consumer"] = consumer
    dbopts = _db_opts(None, target, kw)
    dst = _endpoint(target, "target", kw)
    opts = _apply_opts(kw, _rewriter(kw), group=group, start=start, idle_timeout=idle_timeout,
                       batch=batch, dry_run=dry_run)
    ok = commands.apply(dst, logspec, opts, dbopts, progress=progress, metrics=_metrics(kw))
    sys.exit(0 if ok else 1)


verify_options = _options(
    click.option("--ttl-tolerance", type=click.IntRange(0), default=1000, show_default=True,
                 metavar="MS", help="Expiry differences up to this many ms are not a difference."),
    click.option("--show-diffs", is_flag=True, help="Print every differing key."),
    click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="PATH.json",
                 help="Write the full report as JSON."),
    click.option("--recheck-delay", type=click.FloatRange(0), default=1.0, show_default=True,
                 metavar="SECONDS", help="Re-check differing keys after this delay before reporting."),
    click.option("--sample", type=click.IntRange(1), metavar="N",
                 help="Compare N random source keys (RANDOMKEY) instead of every key of both "
                      "sides: for big sources; the result says it is a sample."),
)


@cli.command(epilog="""
\b
Examples:
  conveyor verify redis://prod:6379 redis://new:6379
  conveyor verify redis://prod:6379 redis://new:6379 --show-diffs --report diffs.json
  conveyor verify redis://prod:6379 redis://new:6379 --db all --max-rate 10000
  conveyor verify redis://prod:6379 redis://new:6379 --key-prefix old:
""")
@click.argument("source")
@click.argument("target")
@verify_options
@db_option
@target_db_option
@click.option("--stream-id", "stream_ids", type=click.Choice(["keep", "drop"]), default="keep",
              show_default=True, help="drop: compare stream entries without their ids (after "
              "apply --stream-id drop).")
@filter_options
@rewrite_options
@rate_options
@progress_option
@click.option("--repair", is_flag=True,
              help="Append the keys found different to --log as ordinary events (read again from "
                   "the source; gone or target-only keys as deletes): an apply of that log then "
                   "writes them.")
@click.option("--log", "log_uri", metavar="URI", help="With --repair: the log the pair's changes "
              "go through (the one capture writes and apply reads).")
@log_options
@log_wait_option
@_endpoint_options("source")
@_endpoint_options("target")
def verify(source, target, progress, repair, log_uri, log_opts, log_wait, **kw):
    """Compare SOURCE and TARGET key by key; exit 1 when anything differs."""
    from conveyor import commands
    if repair and not log_uri:
        raise click.UsageError("--repair needs --log URI: the log apply reads, where the repairs "
                               "are appended")
    if (log_uri or log_opts) and not repair:
        raise click.UsageError("--log and --log-opt are for --repair")
    dbopts = _db_opts(source, target, kw)
    src, dst = _endpoint(source, "source", kw), _endpoint(target, "target", kw)
    opts = _verify_opts(kw, _filter(kw), _rewriter(kw))
    log = LogSpec(log_uri, _log_opts(log_opts), log_wait) if repair else None
    ok = commands.verify(src, dst, opts, dbopts, progress=progress, repair=log)
    sys.exit(0 if ok else 1)


@cli.command(epilog="""
\b
Examples:
  conveyor replicate redis://prod:6379 redis://new:6379
  conveyor replicate redis://prod:6379 redis://new:6379 --mode live --max-rate 20000
  conveyor replicate redis://prod:6379 redis://cluster-node:7000 --log kafka://broker:9092/m
  conveyor replicate redis://prod:6379 redis://new:6379 --mode compare --show-diffs
""")
@click.argument("source")
@click.argument("target")
@click.option("--mode", type=click.Choice(["snapshot", "live", "liveonly", "compare"]),
              default="snapshot", show_default=True,
              help="snapshot: copy then verify; live/liveonly: follow changes until idle or "
                   "interrupted, then verify; compare: verify only.")
@click.option("--log", "log_uri", metavar="URI",
              help="The log to go through (default: a file log in --state-dir).")
@click.option("--state-dir", default=".conveyor", show_default=True, type=click.Path(file_okay=False),
              help="Where the embedded file log lives when --log is not given, and capture's key "
                   "ledger (live modes).")
@click.option("--group", default="apply", show_default=True, help="Consumer group of the apply side.")
@click.option("--no-verify", is_flag=True, help="Skip the verify pass after copying.")
@click.option("--dry-run", is_flag=True, help="Read the source and write the log; write nothing to the target.")
@click.option("--fresh", is_flag=True, help="Start a new snapshot even if an interrupted one can resume.")
@click.option("--repair", is_flag=True,
              help="--mode compare: what verify finds different is queued on the log (--log, or "
                   "the one in --state-dir), applied, and verified again; exit 0 only when the "
                   "re-check finds the target identical.")
@click.option("--cleanup", is_flag=True,
              help="After a run that succeeds, remove the file log and key ledgers kept in "
                   "--state-dir (not with --log: that log is yours to remove).")
@db_option
@target_db_option
@collisions_option
@live_options
@type_options
@rate_options
@write_options
@_endpoint_options("source")
@_endpoint_options("target")
@verify_options
@filter_options
@rewrite_options
@log_options
@log_wait_option
@metrics_options
@progress_option
def replicate(source, target, mode, log_uri, state_dir, group, no_verify, dry_run, fresh, repair,
              cleanup, log_opts, log_wait, progress, **kw):
    """Capture + apply (+ verify) in one command, over the log."""
    from conveyor import commands
    if repair and mode != "compare":
        raise click.UsageError("--repair goes with --mode compare (a copy writes every key anyway)")
    if repair and dry_run:
        raise click.UsageError("--repair writes to the log and the target: not with --dry-run")
    src, dst = _endpoint(source, "source", kw), _endpoint(target, "target", kw)
    flt, rw = _filter(kw), _rewriter(kw)
    dbopts = _db_opts(source, target, kw)
    if mode == "compare":
        if dry_run or no_verify or dbopts.allow_collisions or cleanup:
            raise click.UsageError("--mode compare only verifies: --dry-run, --no-verify, "
                                   "--cleanup and --allow-collisions mean nothing to it")
        if repair:
            log = LogSpec(log_uri or _state_log(state_dir, source, target), _log_opts(log_opts),
                          log_wait)
            ok = commands.compare_and_repair(src, dst, log, _verify_opts(kw, flt, rw),
                                             _apply_opts(kw, rw, group=group, idle_timeout=1.0),
                                             dbopts, progress=progress)
        else:
            ok = commands.verify(src, dst, _verify_opts(kw, flt, rw), dbopts, progress=progress)
        sys.exit(0 if ok else 1)
    if cleanup and log_uri:
        raise click.UsageError("--cleanup removes the file log replicate keeps in --state-dir; "
                               "with --log the log is yours: remove it yourself")
    logspec = LogSpec(log_uri or _state_log(state_dir, source, target), _log_opts(log_opts),
                      log_wait)
    opts = ReplicateOptions(
        capture=_capture_opts(mode, fresh, kw, flt, state_dir),
        apply=_apply_opts(kw, rw, group=group, dry_run=dry_run),
        verify=None if no_verify or dry_run else _verify_opts(kw, flt, rw))
    ok = commands.replicate(src, dst, logspec, opts, dbopts, progress=progress,
                            metrics=_metrics(kw), embedded=not log_uri, cleanup=cleanup)
    sys.exit(0 if ok else 1)


@cli.command(epilog="""
\b
Examples:
  conveyor status --log file:./migration
  conveyor status --log kafka://broker:9092/migration --group apply --json
  conveyor status --log file:./migration --wait-synced --timeout 600
""")
@click.option("--log", "log_uri", required=True, metavar="URI")
@click.option("--group", default="apply", show_default=True,
              help="The apply group shown; with --wait-synced, the one waited for (default: "
                   "every group that applied from the log).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--wait-synced", is_flag=True,
              help="Cutover: wait until every capture is live with nothing left to read and "
                   "every apply group has applied all that was captured up to the call; exit 0 "
                   "then, 1 with what is still behind when --timeout passes. Pause writes on the "
                   "source first (CLIENT PAUSE ... WRITE).")
@click.option("--timeout", type=click.FloatRange(0), metavar="SECONDS",
              help="With --wait-synced: give up after this long (default: wait until synced).")
@click.option("--gone-after", type=click.FloatRange(0), default=30.0, show_default=True,
              metavar="SECONDS",
              help="A capture or apply process whose status was not refreshed for this long "
                   "(killed, host lost) is shown as gone. Processes refresh it every second, live "
                   "captures every 5 s: keep it above that.")
@log_options
@click.pass_context
def status(ctx, log_uri, group, as_json, wait_synced, timeout, gone_after, log_opts):
    """Every capture process of the log and every apply process of the group (state, keys,
    lag, last seen); per partition: committed position, end of the log, lag."""
    from conveyor import commands
    if timeout is not None and not wait_synced:
        raise click.UsageError("--timeout is for --wait-synced")
    log = LogSpec(log_uri, _log_opts(log_opts))
    if wait_synced:
        given = ctx.get_parameter_source("group") != click.core.ParameterSource.DEFAULT
        ok = commands.wait_synced(log, [group] if given else None, timeout, as_json, gone_after)
        sys.exit(0 if ok else 1)
    commands.status(log, group, as_json, gone_after)


@cli.command()
@click.option("--keys", type=click.IntRange(1, 10_000_000), default=10_000, show_default=True,
              help="How many sample keys to load into the throwaway source.")
@progress_option
def demo(keys, progress):
    """Migrate sample data between two throwaway local Redis servers, then verify."""
    from conveyor import demo as demo_mod
    sys.exit(0 if demo_mod.run(keys, progress) else 1)


def _env_names(group: click.Group) -> None:
    """Every option can also come from CONVEYOR_<COMMAND>_<OPTION>, named after its flag
    (CONVEYOR_APPLY_IDLE_TIMEOUT=30, CONVEYOR_CAPTURE_LOG=...), so one image runs under compose or
    Kubernetes without a shell. Options with a name of their own (CONVEYOR_SOURCE_PASSWORD) keep it."""
    for name, command in group.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.envvar and param.opts[0].startswith("--"):
                flag = param.opts[0][2:].replace("-", "_").upper()
                param.envvar = f"CONVEYOR_{name.upper()}_{flag}"
                param.show_envvar = False


_env_names(cli)


def _from_environment(e: click.UsageError) -> str | None:
    """A bad value that came from a CONVEYOR_… variable is named as the variable (the user
    typed no such option)."""
    param = getattr(e, "param", None)
    if e.ctx is None or param is None or not isinstance(param.envvar, str):
        return None
    if e.ctx.get_parameter_source(param.name) != click.core.ParameterSource.ENVIRONMENT \
            and param.envvar not in os.environ:
        return None
    given = [a for a in (param.opts or []) if a in sys.argv[1:] or
             any(x.startswith(a + "=") for x in sys.argv[1:])]
    if given:
        return None                       # given on the command line: named as the option
    why = getattr(e, "message", "") or e.format_message()
    value = "" if "PASSWORD" in param.envvar else f"={os.environ.get(param.envvar, '')!r}"
    return f"environment variable {param.envvar}{value} (for {param.opts[0]}): {why}"


def _closed_pipe() -> None:
    """Whoever read the output stopped (``| head``): end quietly, as Unix tools do (the status
    of a process a pipe closed on, 128 + SIGPIPE), with nothing more written to the pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass
    os._exit(128 + signal.SIGPIPE)


def main() -> None:
    """Entry point: usage errors are one line too (exit 2), as is everything else."""
    try:
        code = cli.main(prog_name="conveyor", standalone_mode=False)
    except BrokenPipeError:
        _closed_pipe()
    except click.UsageError as e:
        hint = f" (see: conveyor {e.ctx.info_name} --help)" if e.ctx and e.ctx.parent else ""
        fatal(f"conveyor: usage error: {_from_environment(e) or e.format_message()}{hint}", 2)
        sys.exit(2)
    except click.Abort:
        fatal("conveyor: aborted", 130)
        sys.exit(130)
    except click.ClickException as e:
        fatal(f"conveyor: error: {e.format_message()}", e.exit_code)
        sys.exit(e.exit_code)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
