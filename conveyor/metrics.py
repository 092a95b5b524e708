"""Prometheus metrics, health and readiness over HTTP (``--metrics-port PORT``).

``/metrics`` serves the Prometheus text format (prometheus-client's own exposition), read at
scrape time from the stats the capture and apply processes keep anyway: the hot paths do not touch
a metric object. ``/healthz`` answers 200 while every watched process has shown a sign of life
(its loop's heartbeat) within ``STUCK_AFTER_S``; ``/readyz`` answers 200 once the log lag of every
watched apply is at most the ready threshold and every capture has finished its initial scan.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from conveyor.errors import ConfigError

log = logging.getLogger("conveyor.metrics")

STUCK_AFTER_S = 120.0        # no heartbeat for this long: /healthz says the process is stuck


class Metrics:
    """Collects from the processes it watches; ``serve(port)`` exposes them over HTTP."""

    def __init__(self, ready_lag: int = 0) -> None:
        self.ready_lag = ready_lag
        self.captures: list = []
        self.appliers: list = []
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)
        self._server: ThreadingHTTPServer | None = None

    def watch_capture(self, proc) -> None:
        self.captures.append(proc)

    def watch_apply(self, proc) -> None:
        self.appliers.append(proc)

    # -- the collector ---------------------------------------------------------------------------
    def describe(self) -> Iterable:
        return self.collect()

    def collect(self) -> Iterable:
        yield from self._capture_families()
        yield from self._apply_families()

    def _capture_families(self) -> Iterable:
        events = CounterMetricFamily("conveyor_capture_events", "Events capture appended to the log",
                                     labels=["kind"])
        gaps = CounterMetricFamily("conveyor_gaps", "Gaps detected (changes possibly missed)")
        resyncs = CounterMetricFamily("conveyor_resyncs", "Catch-up scans started to heal gaps")
        upserts = deletes = n_gaps = n_resyncs = 0
        for proc in self.captures:
            st = proc.stats
            upserts, deletes = upserts + st.keys, deletes + st.deletes
            n_gaps, n_resyncs = n_gaps + len(st.gaps), n_resyncs + st.resyncs
        events.add_metric(["upsert"], upserts)
        events.add_metric(["delete"], deletes)
        gaps.add_metric([], n_gaps)
        resyncs.add_metric([], n_resyncs)
        return (events, gaps, resyncs)

    def _apply_families(self) -> Iterable:
        outcomes = CounterMetricFamily("conveyor_apply_events", "Log records apply handled",
                                       labels=["outcome"])
        dead = CounterMetricFamily("conveyor_dead_letters", "Records dead-lettered")
        retries = CounterMetricFamily("conveyor_target_retries", "Batches retried on the target")
        lag_s = GaugeMetricFamily("conveyor_apply_lag_seconds",
                                  "Now minus the source read time of the last applied event")
        lag_r = GaugeMetricFamily("conveyor_log_lag_records", "Records on the log not yet applied")
        up = GaugeMetricFamily("conveyor_target_up", "1 while the target takes writes")
        totals: dict[str, int] = {}
        n_dead = n_retries = 0
        for proc in self.appliers:
            st = proc.stats
            for outcome, n in st.outcomes().items():
                totals[outcome] = totals.get(outcome, 0) + n
            n_dead += st.dead_letters
            n_retries += st.retries
        for outcome, n in sorted(totals.items()):
            outcomes.add_metric([outcome], n)
        dead.add_metric([], n_dead)
        retries.add_metric([], n_retries)
        if self.appliers:                # gauges only where an apply runs (families always)
            now_ms = time.time() * 1000
            read = [p.stats.last_read_ms for p in self.appliers if p.stats.last_read_ms]
            lag_s.add_metric([], max((now_ms - min(read)) / 1000, 0.0) if read else 0.0)
            lags = [p.stats.log_lag for p in self.appliers if p.stats.log_lag is not None]
            if lags:
                lag_r.add_metric([], max(lags))
            up.add_metric([], 0 if any(p.target_down for p in self.appliers) else 1)
        return (outcomes, dead, retries, lag_s, lag_r, up)

    # -- health ----------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        now = time.monotonic()
        stale = {type(p).__name__: round(now - p.heartbeat, 1)
                 for p in self.captures + self.appliers if now - p.heartbeat > STUCK_AFTER_S}
        return not stale, {"stuck_for_s": stale} if stale else {"status": "ok"}

    def readiness(self) -> tuple[bool, dict]:
        why = {}
        if not self.captures and not self.appliers:
            why["process"] = "starting"
        for p in self.captures:
            if not p.caught_up:
                why["capture"] = "initial scan not finished"
        for p in self.appliers:
            lag = p.stats.log_lag
            if lag is None or lag > self.ready_lag:
                why["apply"] = f"log lag {lag if lag is not None else 'unknown'} > {self.ready_lag}"
        return not why, why or {"status": "ready"}

    # -- HTTP ------------------------------------------------------------------------------------
    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start serving on a daemon thread; returns the port (useful with port 0)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, doc = metrics.health() if path == "/healthz" else metrics.readiness()
                    self._send(200 if ok else 503, json.dumps(doc).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise ConfigError(f"--metrics-port {port}: cannot listen: {e.strerror}") from e
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
