"""Elasticsearch with its HTTP API: one node of codelibs' elasticsearch-cluster-runner (Maven Central).

The runner embeds Elasticsearch 7.10.2, the last Apache-licensed release; the Python client is kept on
major version 7 to match (pyproject pins elasticsearch<8).
"""

from __future__ import annotations

import shutil

from cluster.services.jvm import LOG4J2_CONSOLE_CONFIG, JvmService

RUNNER_VERSION = "7.10.2.0"
# Elasticsearch 7.10.2 ships log4j 2.11.1 (CVE-2021-44228); 2.17.2 is the fixed release its API allows.
PATCHED_LOG4J = ("org.apache.logging.log4j:log4j-api:2.17.2", "org.apache.logging.log4j:log4j-core:2.17.2")


class Elasticsearch(JvmService):
    name = "elasticsearch"
    port_setting = "elasticsearch_port"
    address_template = "http://{host}:{port}"
    artifacts = (f"org.codelibs:elasticsearch-cluster-runner:{RUNNER_VERSION}",)
    pinned = PATCHED_LOG4J
    launcher = "ElasticsearchServer"

    def command(self) -> list[str]:
        cluster_dir = self.data_dir / "cluster"
        # The runner writes a default log configuration (to rolling JSON files) only where none exists.
        config_dir = cluster_dir / "node_1" / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(LOG4J2_CONSOLE_CONFIG, config_dir / "log4j2.properties")
        services = self.settings.services
        return self.java_command(
            self.launcher,
            str(cluster_dir),
            self.host,
            str(self.port),
            str(services.elasticsearch_transport_port),
            # Elasticsearch's own start script names its distribution; jars from Maven Central carry no
            # name, and the Python client (7.14+) accepts only a server that reports the default one.
            system_properties={"es.distribution.flavor": "default", "es.distribution.type": "tar"},
        )

    def answers(self) -> bool:
        from elasticsearch import Elasticsearch as Client

        with Client(self.address, timeout=3) as client:
            return client.cluster.health()["status"] in {"green", "yellow"}
