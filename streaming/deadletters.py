"""Where records that cannot be used go, with the reason: a Kafka topic (Kafka sources) or JSON-lines
files (the embedded replay source). ``write`` returns once the letters are durable, because the
consumer checkpoints past them right after.

Each letter names its source partition and offset. The files are exactly-once: a partition's file
never takes an offset it already holds, so a replay after a crash adds nothing, and since a
consumer hands batches over in the order their scoring finishes (not the order they were read),
the files remember the set of offsets they hold, not the highest one (loaded from the files when a
partition is first written). A line torn by a crash mid-append is cut off when the file is loaded:
its ``write`` never returned, so the consumer writes that letter again. The topic is at-least-once
and keyed ``<partition>@<offset>``, so readers (or topic compaction) can drop a repeat.
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
from streaming.files import fsync_directory


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
        self._held: dict[str, set[int]] = {}

    def _file(self, partition: str) -> Path:
        return self.directory / f"{quote(partition, safe='')}.jsonl"

    def _offsets_held(self, partition: str) -> set[int]:
        """The offsets the partition's file holds, read from it on first use."""
        if partition not in self._held:
            held = set()
            path = self._file(partition)
            if path.is_file():
                data = path.read_bytes()
                complete = data.rfind(b"\n") + 1
                if complete < len(data):  # a torn last line: drop it before appending after it
                    with path.open("r+b") as handle:
                        handle.truncate(complete)
                        os.fsync(handle.fileno())
                held = {json.loads(line)["offset"] for line in _complete_lines(data)}
            self._held[partition] = held
        return self._held[partition]

    def write(self, letters: Sequence[DeadLetter]) -> None:
        by_partition: dict[str, list[DeadLetter]] = {}
        for letter in letters:
            by_partition.setdefault(letter.partition, []).append(letter)
        for partition, group in by_partition.items():
            held = self._offsets_held(partition)
            fresh = list({letter.offset: letter for letter in group if letter.offset not in held}.values())
            if not fresh:
                continue
            path = self._file(partition)
            created = not path.exists()
            with path.open("a") as handle:
                handle.write("".join(json.dumps(letter.as_json()) + "\n" for letter in fresh))
                handle.flush()
                os.fsync(handle.fileno())
            if created:  # the new file's name must survive a crash too
                fsync_directory(self.directory)
            held.update(letter.offset for letter in fresh)

    def read(self) -> list[dict]:
        """Every letter stored here (for summaries and tests)."""
        return [json.loads(line) for path in sorted(self.directory.glob("*.jsonl")) for line in _complete_lines(path.read_bytes())]


def _complete_lines(data: bytes) -> list[bytes]:
    """The non-empty lines of a JSON-lines file, without a last line torn by a crash."""
    return [line for line in data[: data.rfind(b"\n") + 1].splitlines() if line.strip()]


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
