"""Kafka over SASL_SSL (SCRAM-SHA-512) and over mutual TLS, against a real KRaft broker with such
listeners (certificates and SCRAM users made at test time). Data copied through the secured log
is compared independently; refusals (wrong password, untrusted broker, no client certificate) are
one line, non-zero exit, never a wait, and no secret is ever printed."""
from __future__ import annotations

import dataclasses
import json
import uuid

import pytest
from cryptography.hazmat.primitives import serialization

from tests import cli
from tests.certs import make_certs
from tests.compare import differences
from tests.datasets import load_mixed
from tests.kafka_broker import KafkaBroker

USER, PASSWORD = "conveyor-app", "pw-Sx9!q-" + uuid.uuid4().hex[:8]
KEYS = 2_000


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("kcerts"))


@pytest.fixture(scope="module")
def secure_broker(certs):
    """A broker of its own: the session broker (PLAINTEXT) stays as the rest of the suite knows it."""
    broker = KafkaBroker(secure=certs, scram_users={USER: PASSWORD}).start()
    yield broker
    broker.stop()


def topic() -> str:
    return f"sec-{uuid.uuid4().hex[:10]}"


def sasl_opts(certs, password: str = PASSWORD, ca=None) -> list[str]:
    return _opts({"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                  "sasl.username": USER, "sasl.password": password,
                  "ssl.ca.location": str(ca or certs.ca)})


def mtls_opts(certs, *, client_cert: bool = True, ca=None) -> list[str]:
    opts = {"security.protocol": "SSL", "ssl.ca.location": str(ca or certs.ca)}
    if client_cert:
        opts |= {"ssl.certificate.location": str(certs.client.cert),
                 "ssl.key.location": str(certs.client.key)}
    return _opts(opts)


def _opts(d: dict[str, str]) -> list[str]:
    return [a for k, v in d.items() for a in ("--log-opt", f"{k}={v}")]


def copy_through(log: str, opts: list[str], redis_factory) -> None:
    """capture a dataset into the secured log, apply it out, compare with plain redis-py reads."""
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), KEYS)
    cap = cli.run("capture", source.url, "--log", log, *opts)
    assert cap.returncode == 0, cap.stdout + cap.stderr
    app = cli.run("apply", target.url, "--log", log, "--idle-timeout", "2", *opts)
    assert app.returncode == 0, app.stdout + app.stderr
    assert source.client().dbsize() >= KEYS
    assert differences(source.client(), target.client()) == []
    for p in (cap, app):
        assert PASSWORD not in p.stdout + p.stderr
    status = cli.run("status", "--log", log, "--json", *opts)
    assert status.returncode == 0, status.stderr
    assert PASSWORD not in status.stdout + status.stderr
    json.loads(status.stdout)


def test_capture_apply_over_sasl_ssl_scram(secure_broker, certs, redis_factory):
    copy_through(f"kafka://{secure_broker.bootstrap_sasl_ssl}/{topic()}", sasl_opts(certs),
                 redis_factory)


def test_capture_apply_over_mutual_tls(secure_broker, certs, redis_factory):
    copy_through(f"kafka://{secure_broker.bootstrap_ssl}/{topic()}", mtls_opts(certs), redis_factory)


def refused(log: str, opts: list[str], redis_server, code: int = 1) -> str:
    """capture against a log that refuses us: one line, exit ``code``, no secret, no waiting."""
    redis_server.client().set("k", "v")
    p = cli.run("capture", redis_server.url, "--log", log, *opts, timeout=60)
    line = cli.assert_one_line_error(p, code)
    assert PASSWORD not in p.stdout + p.stderr
    return line


def test_wrong_sasl_password_is_one_line(secure_broker, certs, redis_server):
    log = f"kafka://{secure_broker.bootstrap_sasl_ssl}/{topic()}"
    line = refused(log, sasl_opts(certs, password=PASSWORD + "-wrong"), redis_server)
    assert "SASL authentication failed" in line and "sasl.password" in line, line
    assert "-wrong" not in line


def test_wrong_sasl_password_with_verbose_logging_prints_no_secret(secure_broker, certs, redis_server):
    """-v shows librdkafka's own lines; the password must not be among them either."""
    log = f"kafka://{secure_broker.bootstrap_sasl_ssl}/{topic()}"
    p = cli.run("-v", "capture", redis_server.url, "--log", log,
                *sasl_opts(certs, password=PASSWORD + "-wrong"), timeout=60)
    assert p.returncode == 1, p.stderr
    assert "SASL authentication failed" in p.stderr
    assert PASSWORD not in p.stdout + p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("listener", ["sasl_ssl", "ssl"])
def test_unknown_ca_for_the_broker_is_one_line(secure_broker, certs, redis_server, listener):
    if listener == "sasl_ssl":
        log, opts = (f"kafka://{secure_broker.bootstrap_sasl_ssl}/{topic()}",
                     sasl_opts(certs, ca=certs.other_ca))
    else:
        log, opts = f"kafka://{secure_broker.bootstrap_ssl}/{topic()}", mtls_opts(certs, ca=certs.other_ca)
    line = refused(log, opts, redis_server)
    assert "broker's certificate is not trusted" in line and "ssl.ca.location" in line, line
    assert "expired" not in line and "host name" not in line


@pytest.mark.parametrize("served, expected", [
    ("expired", "certificate has expired"),
    ("wrong_host", "not for this host name or address"),
])
def test_broker_certificate_problems_name_the_cause(certs, redis_server, served, expected):
    """A broker of its own serving a bad certificate (signed by the right CA)."""
    broker = KafkaBroker(secure=dataclasses.replace(certs, server=getattr(certs, served))).start()
    try:
        line = refused(f"kafka://{broker.bootstrap_ssl}/{topic()}", mtls_opts(certs), redis_server)
    finally:
        broker.stop()
    assert "TLS: the broker's certificate" in line and expected in line, line


def test_missing_client_certificate_is_one_line(secure_broker, certs, redis_server):
    line = refused(f"kafka://{secure_broker.bootstrap_ssl}/{topic()}",
                   mtls_opts(certs, client_cert=False), redis_server)
    assert "refused the client certificate" in line and "ssl.certificate.location" in line, line


def test_plaintext_client_on_the_sasl_listener_is_not_mistaken_for_success(secure_broker, redis_server):
    """No security options at all against a SASL_SSL listener: no data can flow, so no success.
    (librdkafka sees only a dropped connection here: it is reported as unreachable.)"""
    log = f"kafka://{secure_broker.bootstrap_sasl_ssl}/{topic()}"
    redis_server.client().set("k", "v")
    p = cli.start("capture", redis_server.url, "--log", log)
    try:
        out, err = p.communicate(timeout=8)
    except Exception:  # noqa: BLE001 - still waiting for the log, as designed: stop it
        p.terminate()
        out, err = p.communicate(timeout=30)
    assert "capture: 1 key," not in out, out + err


def test_unreadable_ca_file_is_one_line_naming_it(secure_broker, certs, redis_server, tmp_path):
    missing = tmp_path / "no-such-ca.crt"
    line = refused(f"kafka://{secure_broker.bootstrap_sasl_ssl}/{topic()}",
                   sasl_opts(certs, ca=missing), redis_server, code=2)
    assert f"ssl.ca.location={missing}: no such file" in line, line


def encrypted_client_key(certs, tmp_path, passphrase: str):
    key = serialization.load_pem_private_key(certs.client.key.read_bytes(), None)
    path = tmp_path / "client-encrypted.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(passphrase.encode())))
    return path


def encrypted_key_opts(certs, tmp_path, passphrase: str, given: str) -> list[str]:
    key = encrypted_client_key(certs, tmp_path, passphrase)
    # the later ssl.key.location wins (the CLI keeps the last KEY=VALUE)
    return mtls_opts(certs) + _opts({"ssl.key.location": str(key), "ssl.key.password": given})


def test_encrypted_client_key_opens_with_ssl_key_password(secure_broker, certs, redis_server, tmp_path):
    passphrase = "kp-" + uuid.uuid4().hex[:10]
    redis_server.client().set("k", "v")
    p = cli.run("capture", redis_server.url, "--log", f"kafka://{secure_broker.bootstrap_ssl}/{topic()}",
                *encrypted_key_opts(certs, tmp_path, passphrase, passphrase), timeout=60)
    assert p.returncode == 0 and "capture: 1 key," in p.stdout, p.stdout + p.stderr
    assert passphrase not in p.stdout + p.stderr


def test_wrong_ssl_key_password_is_one_line_without_it(secure_broker, certs, redis_server, tmp_path):
    passphrase = "kp-" + uuid.uuid4().hex[:10]
    line = refused(f"kafka://{secure_broker.bootstrap_ssl}/{topic()}",
                   encrypted_key_opts(certs, tmp_path, passphrase, passphrase + "-bad"), redis_server, code=2)
    assert "ssl.key.location" in line and "ssl.key.password" in line, line
    assert passphrase not in line


def test_sasl_options_from_the_environment(secure_broker, certs, redis_server):
    """CONVEYOR_CAPTURE_LOG_OPT (space-separated KEY=VALUE) keeps the password off the command
    line, where any user of the machine could read it in the process list."""
    redis_server.client().set("k", "v")
    pairs = [a for a in sasl_opts(certs) if a != "--log-opt"]
    env = {**cli.env(), "CONVEYOR_CAPTURE_LOG_OPT": " ".join(pairs)}
    p = cli.run("capture", redis_server.url, "--log",
                f"kafka://{secure_broker.bootstrap_sasl_ssl}/{topic()}", env=env, timeout=60)
    assert p.returncode == 0 and "capture: 1 key," in p.stdout, p.stdout + p.stderr
    assert PASSWORD not in p.stdout + p.stderr
