"""Neo4j with its Bolt connector: the DBMS from Maven Central's org.neo4j:neo4j, started by our launcher."""

from __future__ import annotations

from cluster.services.jvm import JvmService

# 5.26 is the LTS line that runs on Java 17 (2025.x needs Java 21).
NEO4J_VERSION = "5.26.30"


class Neo4j(JvmService):
    name = "neo4j"
    port_setting = "neo4j_bolt_port"
    address_template = "bolt://{host}:{port}"
    artifacts = (f"org.neo4j:neo4j:{NEO4J_VERSION}",)
    launcher = "Neo4jServer"

    def command(self) -> list[str]:
        return self.java_command(self.launcher, str(self.data_dir / "home"), self.host, str(self.port))

    def answers(self) -> bool:
        from neo4j import GraphDatabase

        with GraphDatabase.driver(self.address, auth=None, connection_timeout=3) as driver:
            records, _, _ = driver.execute_query("RETURN 1 AS one")
            return records[0]["one"] == 1
