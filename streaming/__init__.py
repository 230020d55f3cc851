"""Streaming: events from Kafka or the file replay source, through windowing and features, scored by
the ModelRouter and written to the lakehouse, effectively once.

Public face:

- ``streaming.pipeline.Pipeline``: N consumer actors over one source plus one lakehouse sink actor
  (``start``, ``wait``, ``finish_at``, ``progress``, ``shutdown``);
- ``streaming.scoring``: what the stream asks of the scoring service (``EnsembleClient``,
  ``rtml.schemas.ScoreRequest`` -> ``ScoreResult`` | ``Refusal``, the HTTP path's types too),
  implemented over the ModelRouter by
  ``deployments.stream_client``;
- ``streaming.demo``: the job behind ``rtml demo`` (whose command, in ``deployments.cli``, wires it to the Serve app).
- ``streaming.eventlog``: the event log that ingestion appends to (``open_event_log_writer``: Kafka,
  or the embedded SQLite log that ``sources.eventlog`` reads, ``streaming.source = "log"``).

Inside: ``router`` (DataRouter: validation, paths per data type, dead letters), ``windowing``
(vectorised per-key event-time windows and model input windows), ``features`` (the feature set and
its rows), ``consumer`` (the loop one actor runs), ``failures`` (which failures are worth retrying),
``checkpoints``, ``deadletters``, ``files`` (their durable local writes), ``sink``, and ``sources``
(``replay``, ``kafka``, ``eventlog``) behind ``sources.base.Source``.
"""
