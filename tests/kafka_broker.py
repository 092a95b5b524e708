"""A real single-node Apache Kafka broker (KRaft, broker + controller in one JVM) for tests.

Run from the Maven Central jars that tests/kafka/fetch-jars.sh puts in .cache/kafka-libs (.ci/setup
calls it). Missing jars are an error, never a skip.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.certs import Certs
from tests.servers import free_port, tail, terminate

ROOT = Path(__file__).resolve().parent.parent
LIBS = ROOT / ".cache" / "kafka-libs"
LOG4J = ROOT / "tests" / "kafka" / "log4j2.xml"
START_TIMEOUT_S = 90


def _java() -> str:
    java = shutil.which("java")
    if not java:
        raise RuntimeError("Java 17+ is needed to run the Kafka broker for the tests")
    return java


class KafkaBroker:
    """``secure``: also a SASL_SSL listener (SCRAM-SHA-512, users ``scram_users`` made by the storage
    format) and an SSL listener that requires a client certificate (mutual TLS), both serving the
    certificate ``secure.server`` signed by ``secure.ca``. PLAINTEXT stays the inter-broker
    listener and the one the fixture's readiness check uses."""

    def __init__(self, secure: Certs | None = None, scram_users: dict[str, str] | None = None) -> None:
        self.port, self.controller_port = free_port(), free_port()
        self.secure = secure
        self.scram_users = scram_users or {}
        self.sasl_port = free_port() if secure else 0
        self.ssl_port = free_port() if secure else 0
        self.dir = Path(tempfile.mkdtemp(prefix="conveyor-kafka-"))
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def bootstrap_sasl_ssl(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def bootstrap_ssl(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"

    def _classpath(self) -> str:
        jars = sorted(LIBS.glob("*.jar"))
        if not any(j.name.startswith("kafka_2.13-") for j in jars):
            raise RuntimeError(f"Kafka jars missing in {LIBS}: run tests/kafka/fetch-jars.sh "
                               "(.ci/setup does)")
        return os.pathsep.join(str(j) for j in jars)

    def _properties(self) -> Path:
        props = {
            "process.roles": "broker,controller", "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER", "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.dir / "data"),
            "offsets.topic.replication.factor": "1", "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": "1", "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "3",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0", "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "num.network.threads": "2", "num.io.threads": "2", "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1", "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(4 * 1024 * 1024),
            "log.cleaner.backoff.ms": "1000",
        }
        if self.secure:
            props.update(self._secure_properties())
        path = self.dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def _secure_properties(self) -> dict[str, str]:
        """The SASL_SSL and SSL listeners. Kafka 4.x reads PEM: the keystore file holds the
        (unencrypted PKCS#8) key followed by the certificate; the truststore file the CA."""
        c = self.secure
        keystore = self.dir / "server-keystore.pem"
        keystore.write_bytes(c.server.key.read_bytes() + c.server.cert.read_bytes())
        listeners = (f"PLAINTEXT://127.0.0.1:{self.port},SASL_SSL://127.0.0.1:{self.sasl_port},"
                     f"SSL://127.0.0.1:{self.ssl_port}")
        return {
            "listeners": f"{listeners},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": listeners,
            "listener.security.protocol.map":
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.ssl.ssl.client.auth": "required",
            "ssl.keystore.type": "PEM", "ssl.keystore.location": str(keystore),
            "ssl.truststore.type": "PEM", "ssl.truststore.location": str(c.ca),
        }

    def _scram_args(self) -> list[str]:
        """StorageTool's --add-scram: KRaft stores SCRAM credentials in the cluster metadata, so
        the users exist from the first start (no broker round trip needed)."""
        out: list[str] = []
        for name, password in self.scram_users.items():
            out += ["--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"]
        return out

    def _java_cmd(self, main: str, *args: str) -> list[str]:
        return [_java(), "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={LOG4J}", "-cp", self._classpath(), main, *args]

    def start(self) -> "KafkaBroker":
        props = self._properties()
        cluster = uuid.uuid4().hex[:22]
        fmt = subprocess.run(self._java_cmd("kafka.tools.StorageTool", "format", "-t", cluster,
                                            "-c", str(props), *self._scram_args()),
                             capture_output=True, text=True, timeout=120)
        if fmt.returncode != 0:
            raise RuntimeError(f"kafka storage format failed: {fmt.stdout}{fmt.stderr}")
        return self.start_again()

    def start_again(self) -> "KafkaBroker":
        """Start the broker on its ports and data dir (after start(), or after kill())."""
        log_file = open(self.dir / "broker.log", "a")
        self.proc = subprocess.Popen(self._java_cmd("kafka.Kafka", str(self.dir / "server.properties")),
                                     stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()                          # the child holds its own descriptor
        self._wait_ready()
        return self

    def kill(self) -> None:
        """kill -9: no shutdown, no flush of the broker's own state; the data dir stays."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0,
                             "logger": _quiet})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kafka broker exited: {self.log_tail()}")
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        raise RuntimeError(f"kafka broker not ready in {START_TIMEOUT_S}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return tail(self.dir / "broker.log", 3000)

    def stop(self) -> None:
        terminate(self.proc, 20)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class _Quiet:
    def log(self, *a, **k):
        pass


_quiet = _Quiet()


def kafka_log_uri(broker: KafkaBroker) -> str:
    """A fresh topic on the broker for one test."""
    return f"kafka://{broker.bootstrap}/t-{uuid.uuid4().hex[:12]}"
