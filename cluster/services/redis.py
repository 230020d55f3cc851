"""Redis from Debian's ``redis-server`` package: the shared storage of the API's per-tenant rate
limits across Ingress replicas (``api.rate_limit_storage = "redis://..."``). No persistence: rate
limit counters live for seconds."""

from __future__ import annotations

import shutil

from cluster.services import debian
from cluster.services.base import Service


class Redis(Service):
    name = "redis"
    port_setting = "redis_port"
    address_template = "redis://{host}:{port}"

    def fetch(self) -> None:
        if shutil.which("redis-server") is None:
            debian.install(["redis-server"])

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--protected-mode", "no",
            # Keep the command line as started: it names the data folder, by which `rtml services`
            # tells its own server from another checkout's (redis otherwise rewrites its title).
            "--set-proc-title", "no",
        ]

    def answers(self) -> bool:
        import redis

        client = redis.Redis(host=self.host, port=self.port, socket_timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
