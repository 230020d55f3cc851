"""Where the stream keeps its files, and durable writes to them, shared by the checkpoints, the
dead-letter files and the embedded event log: data is on disk once ``os.fsync`` of the file
returns, and a file's name (its creation or a rename over an old file) once the directory holding
it is fsynced too."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rtml.settings import Settings


def storage_dir(configured: str, settings: Settings, name: str) -> str:
    """The configured directory, or ``<home>/streaming/<name>`` when none is configured."""
    return configured or str(settings.home_dir / "streaming" / name)


def fsync_directory(directory: str | Path) -> None:
    """Make the directory's entries (files created or renamed in it) durable."""
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def replace_durably(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data``, atomically and durably: written to a staging file
    beside it and fsynced, renamed over the old file, then the directory fsynced. A crash at any
    point leaves the old file or the new one whole, never a torn one."""
    path = Path(path)
    staging = path.with_name(path.name + ".writing")
    with staging.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    fsync_directory(path.parent)
