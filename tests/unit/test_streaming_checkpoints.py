"""Consumer checkpoints on a local disk: replaced atomically, and an unreadable one is a clear error
that names the file and what to do, never a pyarrow traceback."""

from __future__ import annotations

import pyarrow as pa
import pytest

from rtml.errors import RtmlError
from streaming.checkpoints import Checkpoint, CheckpointStore
from streaming.windowing import WindowSpec, WindowState

PARTITION = "rtml.events:0"


def _checkpoint(offset: int) -> Checkpoint:
    state = WindowState(WindowSpec(60_000_000, 60_000_000, 0, 3))
    state.process(["acme/pump-1", "acme/pump-1"], [1_000_000, 2_000_000], [1.0, 2.0], partitions=[0, 0])
    keys, windows = state.to_arrow(0)
    return Checkpoint(offset, keys, windows)


def _store(tmp_path) -> CheckpointStore:
    return CheckpointStore(tmp_path, "group-a", "features-v1")


def test_a_saved_checkpoint_replaces_the_last_one_and_leaves_no_staging_file(tmp_path):
    store = _store(tmp_path)
    store.save(PARTITION, _checkpoint(10))
    store.save(PARTITION, _checkpoint(20))

    loaded = _store(tmp_path).load(PARTITION)

    assert loaded.offset == 20
    assert loaded.keys.equals(_checkpoint(20).keys) and loaded.windows.equals(_checkpoint(20).windows)
    assert [path.name for path in (tmp_path / "group-a").iterdir()] == ["rtml.events%3A0.arrow"]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: b"\x00garbage, not an Arrow file" * 20, id="garbage"),
    ],
)
def test_an_unreadable_checkpoint_is_a_clear_error_naming_the_file_and_the_fix(tmp_path, damage):
    store = _store(tmp_path)
    store.save(PARTITION, _checkpoint(10))
    (path,) = (tmp_path / "group-a").iterdir()
    path.write_bytes(damage(path.read_bytes()))

    with pytest.raises(RtmlError) as raised:
        store.load(PARTITION)

    message = str(raised.value)
    lowered = message.lower()
    assert str(path) in message and PARTITION in message
    assert "restore" in lowered and "delete" in lowered
    assert not isinstance(raised.value, pa.ArrowException)


def test_a_checkpoint_whose_window_state_is_damaged_is_a_clear_error(tmp_path):
    store = _store(tmp_path)
    good = _checkpoint(10)
    row = pa.table(
        {
            "offset": pa.array([10], pa.int64()),
            "fingerprint": pa.array([store.fingerprint]),
            "keys": pa.array([b"not arrow ipc"], pa.binary()),
            "windows": pa.array([b"nor this"], pa.binary()),
        }
    )
    store.save(PARTITION, good)
    (path,) = (tmp_path / "group-a").iterdir()
    with pa.OSFile(str(path), "wb") as handle, pa.ipc.new_file(handle, row.schema) as writer:
        writer.write_table(row)

    with pytest.raises(RtmlError, match="unreadable"):
        store.load(PARTITION)
