"""TLS to source and target: mutual TLS works, verification is on by default, and every
certificate problem is one line naming its cause (certificates made at test time)."""
from __future__ import annotations

import pytest

from tests import cli
from tests.certs import make_certs
from tests.compare import differences
from tests.datasets import load_mixed
from tests.servers import redis70_binary, RedisServer


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_server(certs, pair=None, *, mutual: bool = True) -> RedisServer:
    pair = pair or certs.server
    client = (str(certs.client.cert), str(certs.client.key)) if mutual else None
    return RedisServer(redis70_binary(), tls=(str(pair.cert), str(pair.key), str(certs.ca)),
                       tls_client=client).start()


@pytest.fixture
def servers(certs):
    started = []

    def make(*args, **kw):
        s = tls_server(certs, *args, **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.cleanup()


def side_options(certs, side: str) -> list[str]:
    return [f"--{side}-cacert", str(certs.ca), f"--{side}-cert", str(certs.client.cert),
            f"--{side}-key", str(certs.client.key)]


def test_replicate_between_mutual_tls_servers(certs, servers, tmp_path):
    source, target = servers(), servers()
    load_mixed(source.client(), 2_000)
    p = cli.run("replicate", source.url, target.url, "--state-dir", str(tmp_path),
                *side_options(certs, "source"), *side_options(certs, "target"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert differences(source.client(), target.client()) == []


@pytest.mark.parametrize("case, expected", [
    ("other CA", "signed by a CA we do not trust"),
    ("expired", "has expired"),
    ("wrong host", "not for this host name"),
    ("no client certificate", "requires a client certificate"),
])
def test_certificate_problems_are_one_line_naming_the_cause(certs, servers, tmp_path, case, expected):
    pair = {"expired": certs.expired, "wrong host": certs.wrong_host}.get(case)
    source = servers(pair)
    opts = side_options(certs, "source")
    if case == "other CA":
        opts[1] = str(certs.other_ca)
    if case == "no client certificate":
        opts = opts[:2]
    p = cli.run("capture", source.url, "--log", f"file:{tmp_path / 'log'}", *opts)
    line = cli.assert_one_line_error(p, 1)
    assert "TLS handshake failed" in line and expected in line, line


def test_rediss_to_a_plain_port_fails_in_seconds_naming_the_handshake(redis_factory, tmp_path):
    import time
    plain = redis_factory()
    began = time.monotonic()
    p = cli.run("capture", plain.url.replace("redis://", "rediss://"), "--log",
                f"file:{tmp_path / 'log'}")
    took = time.monotonic() - began
    line = cli.assert_one_line_error(p, 1)
    assert "TLS handshake failed" in line and "plain (non-TLS)" in line, line
    assert took < 20, took          # not the 30 s socket timeout


def test_insecure_accepts_an_unverified_certificate(certs, servers, tmp_path):
    source = servers(certs.wrong_host)
    source.client(ssl_check_hostname=False).set("k", "v")
    opts = side_options(certs, "source")[2:] + ["--source-insecure"]
    p = cli.run("capture", source.url, "--log", f"file:{tmp_path / 'log'}", *opts)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "capture: 1 key," in p.stdout


def test_tls_options_need_a_rediss_uri(certs, tmp_path):
    p = cli.run("capture", "redis://127.0.0.1:1/0", "--log", f"file:{tmp_path / 'log'}",
                "--source-cacert", str(certs.ca))
    assert "need a rediss:// URI" in cli.assert_one_line_error(p, 2)


def test_password_from_a_file_and_options_from_the_environment(certs, servers, tmp_path):
    source = RedisServer(redis70_binary(), password="file-secret").start()
    try:
        source.client().set("k", "v")
        secret = tmp_path / "source-password"
        secret.write_text("file-secret\n")
        env = {**cli.env(), "CONVEYOR_CAPTURE_LOG": f"file:{tmp_path / 'log'}"}  # --log
        p = cli.run("capture", f"redis://127.0.0.1:{source.port}/0", "--source-password-file",
                    str(secret), env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "capture: 1 key," in p.stdout
        assert "file-secret" not in p.stdout + p.stderr
        both = cli.run("capture", f"redis://127.0.0.1:{source.port}/0", "--source-password-file",
                       str(secret), "--source-password", "x", env=env)
        assert "give one" in cli.assert_one_line_error(both, 2)
    finally:
        source.cleanup()


def test_a_mutual_tls_buffer_redis_through_log_options(certs, servers, redis_factory):
    source, target, buffer = redis_factory(), redis_factory(), servers()
    load_mixed(source.client(), 1_000)
    opts = ["--log-opt", f"cacert={certs.ca}", "--log-opt", f"cert={certs.client.cert}",
            "--log-opt", f"key={certs.client.key}"]
    log = f"{buffer.url}/0"
    cli.run("capture", source.url, "--log", log, *opts, check=True)
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", *opts, check=True)
    assert differences(source.client(), target.client()) == []
    assert buffer.client().exists("conveyor:0")           # the records went through the buffer
    p = cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", *opts[:2])
    line = cli.assert_one_line_error(p, 1)
    assert "client certificate" in line and "--log-opt cert=" in line, line
