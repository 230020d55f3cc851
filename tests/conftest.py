"""Session-wide fixtures: one local Ray cluster per test session, and the real test services.

Services: with CI=true a service that does not answer fails the test; outside CI the test is
skipped with a message naming `rtml services up`.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one (starting Ray costs seconds). Its
    processes run Serve in the throughput-optimised mode that `rtml up` and the demo give theirs,
    and log JSON lines into the session's worker files as theirs do (observability.logs)."""
    import ray

    from deployments.control import throughput_environment
    from observability.logs import ray_runtime_env
    from rtml.settings import Settings

    if not ray.is_initialized():
        settings = Settings()
        # Logical CPUs are Ray's admission tokens: a module's app, its own stream, a test's
        # pipeline and their detector fit workers hold about 4 at once.
        ray.init(
            num_cpus=6,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env=ray_runtime_env(settings, throughput_environment(settings)),
        )
    yield ray
    ray.shutdown()


def _answering(name: str):
    """The named test service, once it answers a real client request."""
    from cluster import services

    service = services.get(name)
    if not service.is_healthy():
        message = f"{name} does not answer at {service.address}: run `rtml services up`"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return service


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Kafka's bootstrap servers, "host:port"."""
    return _answering("kafka").address


@pytest.fixture(scope="session")
def neo4j_uri() -> str:
    """Neo4j's Bolt URI, "bolt://host:port" (authentication off: pass auth=None)."""
    return _answering("neo4j").address


@pytest.fixture(scope="session")
def elasticsearch_url() -> str:
    return _answering("elasticsearch").address


@pytest.fixture(scope="session")
def prometheus_url() -> str:
    return _answering("prometheus").address


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """A SQLAlchemy URL "postgresql+psycopg2://...", usable as pyiceberg's SQL catalog uri."""
    return _answering("postgres").address


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Redis, "redis://host:port" (the API's shared rate-limit storage)."""
    return _answering("redis").address


@pytest.fixture(scope="session")
def alertmanager_url() -> str:
    """Alertmanager's base URL, "http://host:port" (API v2 under /api/v2; amtool's --alertmanager.url)."""
    return _answering("alertmanager").address
