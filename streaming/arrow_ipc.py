"""Arrow tables as Arrow IPC stream bytes, the form in which a consumer's rows travel to the sink and
its window state into checkpoints. Handing Ray the bytes rather than the tables matters on the
stream path: Ray's own serialisation of a table walks it column by column in Python, which was
29% of a consumer's active CPU at 2,000 events/s (benchmarks/RESULTS.md, streaming)."""

from __future__ import annotations

import pyarrow as pa


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
