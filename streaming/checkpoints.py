"""Consumer checkpoints: per partition, the next offset to read and the window state as of it.

A consumer writes a partition's checkpoint only after everything it produced from the records
before that offset is durable (lakehouse rows, dead letters), and before it commits the offset to
Kafka. A restarted consumer (or the next owner of the partition) resumes from the checkpoint with
the same window state, so it recomputes exactly what was lost and the lakehouse's idempotent
writes drop what had landed already: effectively-once. Kafka's group offsets follow the
checkpoints, for lag and for tools; they are never ahead of them.

One file per partition, replaced atomically (a new file renamed over the old one on local disks; a
single-object write on object stores), holding the offset, the window state (Arrow IPC) and a
fingerprint of the window and feature definitions: state built under other definitions is refused
rather than silently mixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.fs as pafs

from rtml.errors import RtmlError
from streaming.arrow_ipc import from_ipc, to_ipc


@dataclass
class Checkpoint:
    offset: int
    keys: pa.Table
    windows: pa.Table


class CheckpointStore:
    def __init__(self, root: str | Path, group: str, fingerprint: str):
        root = str(root)
        if "://" in root:
            self._fs, base = pafs.FileSystem.from_uri(root)
        else:
            self._fs, base = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
        self.location = f"{root.rstrip('/')}/{quote(group, safe='')}"
        self._dir = f"{base.rstrip('/')}/{quote(group, safe='')}"
        self._fs.create_dir(self._dir, recursive=True)
        self.fingerprint = fingerprint

    def _path(self, partition: str) -> str:
        return f"{self._dir}/{quote(partition, safe='')}.arrow"

    def load(self, partition: str) -> Checkpoint | None:
        path = self._path(partition)
        if self._fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self._fs.open_input_file(path) as handle:
            row = pa.ipc.open_file(handle).read_all().to_pylist()[0]
        if row["fingerprint"] != self.fingerprint:
            raise RtmlError(
                f"the checkpoint of partition {partition} in {self.location} was written under other window or "
                f"feature settings ({row['fingerprint']}, now {self.fingerprint}); use a new consumer group, or "
                "delete the checkpoints to start the group over"
            )
        return Checkpoint(row["offset"], from_ipc(row["keys"]), from_ipc(row["windows"]))

    def save(self, partition: str, checkpoint: Checkpoint) -> None:
        row = pa.table(
            {
                "offset": pa.array([checkpoint.offset], pa.int64()),
                "fingerprint": pa.array([self.fingerprint]),
                "keys": pa.array([to_ipc(checkpoint.keys)], pa.binary()),
                "windows": pa.array([to_ipc(checkpoint.windows)], pa.binary()),
            }
        )
        path = self._path(partition)
        staging = f"{path}.writing"
        with self._fs.open_output_stream(staging) as handle, pa.ipc.new_file(handle, row.schema) as writer:
            writer.write_table(row)
        self._fs.move(staging, path)
