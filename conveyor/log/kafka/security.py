"""Security failures (SASL, TLS) that waiting cannot cure, said in one line, secrets masked."""
from __future__ import annotations

import logging
import os
import re
import socket
import ssl

from confluent_kafka import KafkaError

from conveyor.errors import LogError

log = logging.getLogger("conveyor.kafka")


# Log options whose values are secrets: never part of any message.
SECRET_OPTS = ("sasl.password", "ssl.key.password", "ssl.keystore.password",
               "sasl.oauthbearer.client.secret")
UNTRUSTED = ("TLS: the broker's certificate is not trusted: ssl.ca.location must name the CA that "
             "signed it")
# Python's ssl words for what librdkafka's "certificate verify failed" leaves out.
VERIFY_CAUSES = (
    ("certificate has expired", "TLS: the broker's certificate has expired"),
    ("mismatch", "TLS: the broker's certificate is not for this host name or address"),
    ("not yet valid", "TLS: the broker's certificate is not valid yet"),
)
# The broker's TLS alerts when it refuses our client certificate (mutual TLS).
CLIENT_CERT_ALERTS = ("alert bad certificate", "alert certificate required", "alert unknown ca",
                      "alert handshake failure")


def _security_cause(err: KafkaError) -> str | None:
    """What is wrong when ``err`` is a security failure that waiting cannot cure, else None.
    librdkafka retries these for ever and reports them only through error_cb."""
    code, text = err.code(), err.str()
    if code in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        return ("SASL authentication failed: wrong sasl.username or sasl.password, or "
                "sasl.mechanism not enabled for this user on the broker")
    if "certificate verify failed" in text:
        return UNTRUSTED
    if any(a in text for a in CLIENT_CERT_ALERTS):
        return ("TLS: the broker refused the client certificate (none given, or not signed by a CA "
                "it trusts): set ssl.certificate.location and ssl.key.location")
    if code == KafkaError._SSL:
        return f"TLS failed: {text.split('(after', 1)[0].strip()}"
    return None


class SecurityWatch:
    """The client's error_cb: passes every error to our logger, and keeps the first security
    failure (wrong password, untrusted certificate) so that opening the log says it in one line
    instead of waiting for a broker that will never let us in."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self.secrets = secrets
        self.cause: str | None = None

    def __call__(self, err: KafkaError) -> None:
        error_cb(err)
        if self.cause is None:
            self.cause = _security_cause(err)
            if self.cause == UNTRUSTED:
                m = re.search(r"ssl://([^/\s]+)/", err.str())
                self.broker = m.group(1) if m else None

    broker: str | None = None          # the broker whose certificate was not trusted

    def masked(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text


def error_cb(err: KafkaError) -> None:
    log.info("kafka client: %s", err)


def refused(props: dict) -> None:
    """LogError (no waiting) when the client met a security failure."""
    watch = props.get("error_cb")
    if isinstance(watch, SecurityWatch) and watch.cause:
        cause = watch.cause
        if cause == UNTRUSTED and watch.broker:
            cause = _untrusted_cause(watch.broker, props)
        raise LogError(watch.masked(f"Kafka at {props['bootstrap.servers']} refused the "
                                    f"connection: {cause}"))


def _untrusted_cause(broker: str, props: dict) -> str:
    """Why the broker's certificate failed verification (expired, another host, unknown CA):
    librdkafka does not say, so one TLS handshake is made with Python's ssl just to ask."""
    host, _, port = broker.rpartition(":")
    try:
        ctx = ssl.create_default_context(cafile=props.get("ssl.ca.location"))
        ctx.check_hostname = props.get("ssl.endpoint.identification.algorithm", "https") != "none"
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=host.strip("[]")):
                return UNTRUSTED
    except ssl.SSLCertVerificationError as e:
        message = e.verify_message or ""
        return next((cause for needle, cause in VERIFY_CAUSES if needle in message), UNTRUSTED)
    except (OSError, ValueError):
        return UNTRUSTED


def unreadable_file(text: str, conf: dict) -> str | None:
    """librdkafka's "ssl.ca.location failed: <OpenSSL code>" said in words: which option, which
    file, and whether it is missing or just not PEM of the right kind."""
    m = re.search(r"(ssl\.[a-z.]*location) failed", text)
    if not m or m.group(1) not in conf:
        return None
    prop, path = m.group(1), str(conf[m.group(1)])
    why = ("no such file" if not os.path.exists(path) else
           "not readable as a PEM key, or a wrong ssl.key.password" if prop == "ssl.key.location" else
           "not readable as PEM")
    return f"{prop}={path}: {why}"
