"""`rtml demo` (the main job) and the wiring of stream consumers to the Serve app. Heavy imports stay
inside the functions, so that `rtml --help` stays instant."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from rtml.errors import RtmlError
from rtml.settings import Settings, get_settings

console = Console()


def deploy_scoring(settings: Settings):
    """Deploy the Serve app on the connected Ray cluster; the stream's client to its ModelRouter.
    (Entry-point code: the one place streaming meets deployments.)"""
    from deployments.control import deploy
    from deployments.stream_client import RouterEnsembleClient

    deploy(settings)
    return RouterEnsembleClient(settings.serving.app_name)


def demo(
    kafka: Annotated[bool, typer.Option("--kafka", help="Go through the real Kafka broker (`rtml services up kafka`) instead of the file replay.")] = False,
    speed: Annotated[float, typer.Option(help="Replay speed: event time passes this many times faster than wall time.")] = 360.0,
    consumers: Annotated[int, typer.Option(help="Consumer actors (default: streaming.consumers).")] = 0,
) -> None:
    """The main job: replay bundled sensor streams through the whole pipeline and summarise."""
    import json
    import logging

    from streaming.data.generate import TRUTH_FILE
    from streaming.demo import print_summary, run_demo

    settings = get_settings()
    if consumers:
        settings = settings.model_copy(update={"streaming": settings.streaming.model_copy(update={"consumers": consumers})})
    if kafka:
        require_kafka(settings)
    from deployments.control import throughput_environment

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the progress bar and summary say what matters
    result = run_demo(settings, deploy_scoring, console, kafka=kafka, speed=speed, ray_env=throughput_environment(settings))
    print_summary(result, json.loads(TRUTH_FILE.read_text()), console)


def require_kafka(settings: Settings) -> None:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers, request_timeout_ms=5000).close()
    except KafkaError as error:
        raise RtmlError(
            f"no Kafka broker answers at {settings.kafka.bootstrap_servers} ({type(error).__name__}); "
            "start one with `rtml services up kafka` or point RTML_KAFKA__BOOTSTRAP_SERVERS at yours"
        ) from None
