"""Apache Kafka: one broker in KRaft mode (broker and controller in one JVM), from Maven Central."""

from __future__ import annotations

import base64
import subprocess
import uuid
from pathlib import Path

from cluster.services.base import ServiceError
from cluster.services.jvm import LOG4J2_CONSOLE_CONFIG, JvmService

KAFKA_VERSION = "4.4.0"
# Kafka's server jars log through SLF4J 1.x; this binds it to the log4j2 they already ship.
SLF4J_BINDING = "org.apache.logging.log4j:log4j-slf4j-impl:2.24.3"


class Kafka(JvmService):
    name = "kafka"
    port_setting = "kafka_port"
    artifacts = (f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}", SLF4J_BINDING)
    stop_timeout_s = 90.0

    def command(self) -> list[str]:
        properties = self.data_dir / "server.properties"
        properties.write_text(self._server_properties())
        logging = {"log4j2.configurationFile": str(LOG4J2_CONSOLE_CONFIG)}
        if not (self.data_dir / "log" / "meta.properties").is_file():
            self._format_storage(properties, logging)
        return self.java_command("kafka.Kafka", str(properties), system_properties=logging)

    def answers(self) -> bool:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.address, request_timeout_ms=3000, bootstrap_timeout_ms=3000)
        try:
            return any(not broker.get("is_fenced") for broker in admin.describe_cluster()["brokers"])
        finally:
            admin.close()

    def _server_properties(self) -> str:
        services = self.settings.services
        controller = f"{self.host}:{services.kafka_controller_port}"
        return f"""# Written by `rtml services up` on every start; edit rtml settings (RTML_SERVICES__*) instead.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{controller}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://{self.address},CONTROLLER://{controller}
advertised.listeners=PLAINTEXT://{self.address}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={self.data_dir / "log"}
# One broker: every internal topic has one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# The default 50 offsets partitions make the first consumer group wait seconds on a small machine.
offsets.topic.num.partitions=8
# Tests start consumer groups constantly; the default 3 s delay would stall each first join.
group.initial.rebalance.delay.ms=0
"""

    def _format_storage(self, properties: Path, logging: dict[str, str]) -> None:
        command = self.java_command(
            "kafka.tools.StorageTool", "format", "--cluster-id", _cluster_id(), "--config", str(properties),
            system_properties=logging,
        )  # fmt: skip
        with self.log_file.open("ab") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise ServiceError(f"Formatting Kafka's storage failed.\n{self.log_excerpt()}")


def _cluster_id() -> str:
    """A Kafka cluster id: a random UUID in URL-safe base64, not starting with '-' (read as an option)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
