"""Consumer checkpoints: per partition, the next offset to read and the window state as of it.

A consumer writes a partition's checkpoint only after everything it produced from the records
before that offset is durable (lakehouse rows, dead letters), and before it commits the offset to
Kafka. A restarted consumer (or the next owner of the partition) resumes from the checkpoint with
the same window state, so it recomputes exactly what was lost and the lakehouse's idempotent
writes drop what had landed already: effectively-once. Kafka's group offsets follow the
checkpoints, for lag and for tools; they are never ahead of them.

One file per partition, replaced atomically and durably (on local disks a staging file is written
and fsynced, renamed over the old one and the directory fsynced, so that a crash or a power cut
leaves the old checkpoint or the new one, whole; on object stores a single-object put), holding the
offset, the window state and the per-entity detector's states (Arrow IPC) and a fingerprint of the
window, feature and detector definitions: state
built under other definitions is refused rather than silently mixed. A checkpoint that cannot be
read (damaged on disk, or written by something else) is refused with the file's name and what to
do; a partition without a checkpoint is rebuilt from the log's beginning where the log still holds
it (``streaming.consumer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.fs as pafs

from rtml.errors import RtmlError
from streaming.arrow_ipc import from_ipc, to_ipc
from streaming.files import replace_durably


@dataclass
class Checkpoint:
    offset: int
    keys: pa.Table
    windows: pa.Table
    # The per-entity detector's states (``streaming.detection``; None: no detector).
    detector_inputs: pa.Table | None = None
    detector_scoring: pa.Table | None = None


class CheckpointStore:
    def __init__(self, root: str | Path, group: str, fingerprint: str):
        root = str(root)
        self._local = "://" not in root
        if self._local:
            self._fs, base = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
        else:
            self._fs, base = pafs.FileSystem.from_uri(root)
        self.location = f"{root.rstrip('/')}/{quote(group, safe='')}"
        self._dir = f"{base.rstrip('/')}/{quote(group, safe='')}"
        self._fs.create_dir(self._dir, recursive=True)
        self.fingerprint = fingerprint

    def _path(self, partition: str) -> str:
        return f"{self._dir}/{quote(partition, safe='')}.arrow"

    def load(self, partition: str) -> Checkpoint | None:
        """The partition's checkpoint, or None when it has none."""
        path = self._path(partition)
        if self._fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        try:
            with self._fs.open_input_file(path) as handle:
                row = pa.ipc.open_file(handle).read_all().to_pylist()[0]
            fingerprint = row["fingerprint"]
            checkpoint = Checkpoint(
                row["offset"],
                from_ipc(row["keys"]),
                from_ipc(row["windows"]),
                *(from_ipc(row[name]) if row.get(name) else None for name in ("detector_inputs", "detector_scoring")),
            )
        except (pa.ArrowException, IndexError, KeyError, TypeError) as error:
            raise RtmlError(
                f"the checkpoint of partition {partition} ({path}) is unreadable ({type(error).__name__}: {error}). "
                "Restore it from a backup; or delete it, and the consumer rebuilds the partition's window state "
                "from the log's beginning (refused if the log no longer holds it); or use a new consumer group"
            ) from None
        if fingerprint != self.fingerprint:
            raise RtmlError(
                f"the checkpoint of partition {partition} in {self.location} was written under other window or "
                f"feature settings ({fingerprint}, now {self.fingerprint}); use a new consumer group, or "
                "delete the checkpoints to start the group over"
            )
        return checkpoint

    def save(self, partition: str, checkpoint: Checkpoint) -> None:
        """Replace the partition's checkpoint; returns once the new one is durable."""
        row = pa.table(
            {
                "offset": pa.array([checkpoint.offset], pa.int64()),
                "fingerprint": pa.array([self.fingerprint]),
                "keys": pa.array([to_ipc(checkpoint.keys)], pa.binary()),
                "windows": pa.array([to_ipc(checkpoint.windows)], pa.binary()),
                **{
                    name: pa.array([to_ipc(table) if table is not None else b""], pa.binary())
                    for name, table in (("detector_inputs", checkpoint.detector_inputs), ("detector_scoring", checkpoint.detector_scoring))
                },
            }
        )
        data = pa.BufferOutputStream()
        with pa.ipc.new_file(data, row.schema) as writer:
            writer.write_table(row)
        path = self._path(partition)
        if self._local:
            replace_durably(path, data.getvalue().to_pybytes())
        else:  # an object store's put replaces the object whole
            with self._fs.open_output_stream(path) as handle:
                handle.write(data.getvalue())
