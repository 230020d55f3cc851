"""Streaming: events from Kafka or the file replay source, through windowing and features, scored by
the ModelRouter and written to the lakehouse (see ``streaming.pipeline`` for the whole path)."""
