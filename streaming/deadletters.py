"""Where records that cannot be used go, with the reason: a Kafka topic (Kafka sources) or JSON-lines
files (the embedded replay source). ``write`` returns once the letters are durable, because the
consumer checkpoints past them right after.

Each letter names its source partition and offset. The files are exactly-once (a partition's file
never takes an offset it already holds, so a replay after a crash adds nothing); the topic is
at-least-once and keyed ``<partition>@<offset>``, so readers (or topic compaction) can drop a
repeat.
"""

from __future__ import annotations

import base64
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from rtml.schemas import utc_now


@dataclass(frozen=True)
class DeadLetter:
    partition: str
    offset: int
    payload: bytes
    reason: str

    def as_json(self) -> dict:
        try:
            text, encoding = self.payload.decode(), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(self.payload).decode(), "base64"
        return {
            "partition": self.partition,
            "offset": self.offset,
            "reason": self.reason,
            "payload": text,
            "payload_encoding": encoding,
            "at": utc_now().isoformat(),
        }


class DeadLetterSink(ABC):
    location: str

    @abstractmethod
    def write(self, letters: Sequence[DeadLetter]) -> None:
        """Store ``letters`` durably (returns when they are)."""

    def close(self) -> None:
        """Release files and connections."""


class FileDeadLetters(DeadLetterSink):
    """One JSON-lines file per source partition under ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser().resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.location = str(self.directory)
        self._last_offset: dict[str, int] = {}

    def _file(self, partition: str) -> Path:
        return self.directory / f"{quote(partition, safe='')}.jsonl"

    def _written_up_to(self, partition: str) -> int:
        if partition not in self._last_offset:
            last = -1
            path = self._file(partition)
            if path.is_file():
                for line in path.read_text().splitlines():
                    if line.strip():
                        last = max(last, json.loads(line)["offset"])
            self._last_offset[partition] = last
        return self._last_offset[partition]

    def write(self, letters: Sequence[DeadLetter]) -> None:
        by_partition: dict[str, list[DeadLetter]] = {}
        for letter in letters:
            by_partition.setdefault(letter.partition, []).append(letter)
        for partition, group in by_partition.items():
            fresh = [letter for letter in group if letter.offset > self._written_up_to(partition)]
            if not fresh:
                continue
            with self._file(partition).open("a") as handle:
                handle.write("".join(json.dumps(letter.as_json()) + "\n" for letter in fresh))
                handle.flush()
                os.fsync(handle.fileno())
            self._last_offset[partition] = max(letter.offset for letter in fresh)

    def read(self) -> list[dict]:
        """Every letter stored here (for summaries and tests)."""
        return [json.loads(line) for path in sorted(self.directory.glob("*.jsonl")) for line in path.read_text().splitlines() if line]


class KafkaDeadLetters(DeadLetterSink):
    def __init__(self, bootstrap_servers: str, topic: str, timeout_s: float):
        from kafka import KafkaProducer

        self.location = f"kafka topic {topic} at {bootstrap_servers}"
        self._topic = topic
        self._timeout_s = timeout_s
        self._producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", retries=2**31 - 1, linger_ms=5)

    def write(self, letters: Sequence[DeadLetter]) -> None:
        sent = [
            self._producer.send(
                self._topic,
                key=f"{letter.partition}@{letter.offset}".encode(),
                value=letter.payload,
                headers=[
                    ("rtml-reason", letter.reason.encode()),
                    ("rtml-partition", letter.partition.encode()),
                    ("rtml-offset", str(letter.offset).encode()),
                ],
            )
            for letter in letters
        ]
        self._producer.flush(timeout=self._timeout_s)
        for delivery in sent:
            delivery.get(timeout=0)  # raises the broker's error if a letter was not stored

    def close(self) -> None:
        self._producer.close()
