"""Issue 9, smaller points: bad input met in the field is one line and a non-zero exit, and
conveyor never writes its own log into the data it migrates."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from conveyor.endpoints import mask_text, mask_uri

from tests import cli
from tests.datasets import load_mixed


@pytest.mark.parametrize("uri, secret", [
    ("redis://:pa/ss@h:6379/0", "pa/ss"),
    ("redis://:p@ss@h", "p@ss"),
    ("rediss://user:s3:cr@t@host:6380/1", "s3:cr@t"),
    ("redis://u:plain@h:1/2", "plain"),
])
def test_passwords_with_slash_at_or_colon_are_masked(uri, secret):
    assert secret not in mask_uri(uri)
    assert "***" in mask_uri(uri)
    text = mask_text(f"cannot reach {uri}, giving up")
    assert secret not in text and text.endswith(", giving up")


def test_uri_with_an_unencoded_slash_in_the_password_is_one_line_without_it(tmp_path):
    p = cli.run("capture", "redis://:pa/ss@127.0.0.1:1/0", "--log", f"file:{tmp_path / 'log'}")
    line = cli.assert_one_line_error(p, 2)
    assert "percent-encoded" in line
    assert "pa/ss" not in p.stderr + p.stdout and "'pa'" not in p.stderr


class _Http(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_port_answering_http_is_one_line_not_an_internal_error(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _Http)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        p = cli.run("capture", f"redis://127.0.0.1:{port}/0", "--log", f"file:{tmp_path / 'log'}")
    finally:
        server.shutdown()
        server.server_close()
    line = cli.assert_one_line_error(p, 1)
    assert "does not answer as a Redis server" in line and "internal error" not in line


def test_compare_mode_refuses_options_that_mean_nothing_to_it(redis_factory):
    s, t = redis_factory(), redis_factory()
    for flag in ("--dry-run", "--no-verify"):
        p = cli.run("replicate", s.url, t.url, "--mode", "compare", flag)
        assert flag in cli.assert_one_line_error(p, 2)


def test_a_log_on_the_source_or_target_database_is_refused(redis_factory):
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 200)
    before = sorted(source.client().keys())

    p = cli.run("capture", f"{source.url}/0", "--log", f"{source.url}/0")
    assert "is the source database itself" in cli.assert_one_line_error(p, 2)
    p = cli.run("apply", f"{target.url}/0", "--log", f"{target.url}/0", "--idle-timeout", "1")
    assert "is the target database itself" in cli.assert_one_line_error(p, 2)
    p = cli.run("replicate", f"{source.url}/0", f"{target.url}/0", "--log", f"{target.url}/0")
    assert "is the target database itself" in cli.assert_one_line_error(p, 2)

    # Nothing of conveyor's was written into either side.
    assert sorted(source.client().keys()) == before
    assert target.client().dbsize() == 0

    # Another database of the same server is a buffer like any other.
    p = cli.run("replicate", f"{source.url}/0", f"{target.url}/0", "--log", f"{source.url}/5")
    assert p.returncode == 0, p.stdout + p.stderr
    assert target.client().dbsize() == len(before)



def test_a_node_of_a_cluster_without_slots_is_refused_on_either_side(redis_factory, tmp_path):
    from tests.servers import free_port
    node = redis_factory(extra=("--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                                "--cluster-config-file", str(tmp_path / "nodes.conf")))
    plain = redis_factory()
    plain.client().set("k", "v")
    p = cli.run("replicate", node.url, plain.url, "--state-dir", str(tmp_path / "a"))
    assert "Redis Cluster that has no hash slots" in cli.assert_one_line_error(p, 2)
    p = cli.run("replicate", plain.url, node.url, "--state-dir", str(tmp_path / "b"))
    assert "Redis Cluster that has no hash slots" in cli.assert_one_line_error(p, 2)
    p = cli.run("verify", plain.url, node.url)
    assert "Redis Cluster that has no hash slots" in cli.assert_one_line_error(p, 2)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.log"))
