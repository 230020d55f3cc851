"""``StreamRunner``: the app's own stream, so that events ingested over HTTP are scored.

One replica supervises a ``streaming.pipeline.Pipeline`` over the event log the Ingress appends to
(Kafka when ``streaming.source`` is ``kafka``, the embedded log otherwise): its consumer actors read
the log, window and score through the app's ModelRouter, and write features and predictions to the
lakehouse, checkpointed under the consumer group ``<app>-stream``. The consumers are Ray actors
owned by this replica: they die with it, and Ray restarts any that crash on their own (the
pipeline's restart policy). If the pipeline stops with an error, ``check_health`` fails, so Serve
replaces the replica, and the new one resumes the group from its checkpoints, losing and
duplicating nothing (``streaming.consumer``).

A replay source (``replay``, the demo's file) is not a live log, so the app reads the embedded log
instead. ``serving.run_stream = false`` leaves the stream out (the demo runs its own pipeline).
"""

from __future__ import annotations

import logging
import threading

from ray import serve

from deployments.agents import AgentGraphClient
from deployments.stream_client import RouterEnsembleClient
from rtml.settings import Settings
from streaming.pipeline import Pipeline

log = logging.getLogger(__name__)


def stream_settings(settings: Settings) -> Settings:
    """``settings`` with the live log the Ingress appends to as the stream's source."""
    source = "kafka" if settings.streaming.source == "kafka" else "log"
    return settings.model_copy(update={"streaming": settings.streaming.model_copy(update={"source": source})})


@serve.deployment
class StreamRunner:
    def __init__(self, settings: Settings):
        self._settings = stream_settings(settings)
        self._failure: BaseException | None = None
        self._pipeline: Pipeline | None = None
        # Serve waits for the constructor; the consumers start beside it, once the router answers.
        threading.Thread(target=self._run, name="stream-runner", daemon=True).start()

    def _run(self) -> None:
        app_name = self._settings.serving.app_name
        try:
            listener = AgentGraphClient(app_name) if self._settings.agents.enabled else None
            self._pipeline = Pipeline(self._settings, RouterEnsembleClient(app_name), group=f"{app_name}-stream", listener=listener)
            self._pipeline.start(until_end=False)
            self._pipeline.wait()
        except BaseException as error:  # reported by check_health, which has Serve replace the replica
            log.error("the app's stream stopped: %s: %s", type(error).__name__, error)
            self._failure = error

    def check_health(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the app's stream stopped ({type(self._failure).__name__}: {self._failure}); Serve restarts it")

    def progress(self) -> dict:
        """Per partition (durable, end) offsets of the stream, as ``Pipeline.progress`` gives them."""
        return {} if self._pipeline is None or not self._pipeline.consumers else self._pipeline.progress().partitions
