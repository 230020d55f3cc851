"""The real servers the tests talk to, run on loopback from registry artifacts (`rtml services`).

    from cluster import services
    kafka = services.get("kafka")          # .address, .is_healthy(), .restart(), .stop(), ...
    services.up(services.select())         # fetch once, start in parallel, wait until each answers

Each service is one module here behind the interface in ``base.Service``; data and logs live under
``<home>/services/<name>/``, downloads in ``<download_cache>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from cluster.services.alertmanager import Alertmanager
from cluster.services.base import Service, ServiceError
from cluster.services.elasticsearch import Elasticsearch
from cluster.services.kafka import Kafka
from cluster.services.neo4j import Neo4j
from cluster.services.postgres import Postgres
from cluster.services.prometheus import Prometheus
from cluster.services.redis import Redis
from rtml.settings import Settings, get_settings

SERVICES: dict[str, type[Service]] = {
    service.name: service for service in (Kafka, Neo4j, Elasticsearch, Prometheus, Postgres, Redis, Alertmanager)
}
NAMES = tuple(SERVICES)

# Called as (service, message, finished) while services come up or go down.
Report = Callable[[Service, str, bool], None]

__all__ = ["NAMES", "Service", "ServiceError", "down", "get", "select", "up"]


def get(name: str, settings: Settings | None = None) -> Service:
    try:
        service_class = SERVICES[name]
    except KeyError:
        raise ServiceError(f"No service named {name!r}; the services are: {', '.join(NAMES)}.") from None
    return service_class(settings or get_settings())


def select(names: Sequence[str] = (), settings: Settings | None = None) -> list[Service]:
    """The named services (all of them when none is named), in a stable order."""
    return [get(name, settings) for name in (names or NAMES)]


def up(services: Sequence[Service], report: Report) -> None:
    """Bring every service up at once (start-up time is mostly JVMs warming up); raises one
    ServiceError naming every service that failed, after the others are up."""

    def bring_up(service: Service) -> None:
        outcome = service.ensure_up(lambda phase: report(service, phase, False))
        report(service, f"{outcome} at {service.address}", True)

    _run_all(services, bring_up, report)


def down(services: Sequence[Service], report: Report) -> None:
    def bring_down(service: Service) -> None:
        report(service, "stopping", False)
        report(service, "stopped" if service.stop() else "was not running from this checkout", True)

    _run_all(services, bring_down, report)


def _run_all(services: Sequence[Service], action: Callable[[Service], None], report: Report) -> None:
    with ThreadPoolExecutor(max_workers=len(services) or 1) as pool:
        futures = {service.name: pool.submit(action, service) for service in services}
    failures = []
    for service in services:
        error = futures[service.name].exception()
        if error is not None:
            report(service, "failed", True)
            if not isinstance(error, ServiceError):
                raise error
            failures.append(f"{service.name}: {error}")
    if failures:
        raise ServiceError("\n".join(failures))
