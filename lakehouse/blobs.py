"""Large binary event payloads, kept as files beside the ``events`` table instead of in its rows.

A blob's path is derived from the tenant and event id, so a replayed event rewrites the same blob
rather than leaving a second copy, and erasure can find it from the row's ``payload_uri``.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.io import FileIO
from pyiceberg.table import Table


def blob_uri(table_location: str, tenant: str, event_id: str) -> str:
    return f"{table_location.rstrip('/')}/blobs/{quote(tenant, safe='')}/{quote(event_id, safe='')}"


def offload_large_payloads(rows: pa.Table, events_table: Callable[[], Table], inline_max_bytes: int) -> pa.Table:
    """Write payloads over ``inline_max_bytes`` as blobs; their rows keep only ``payload_uri``.
    ``events_table`` (where blobs go) is loaded only when there is one to write."""
    large = pc.fill_null(pc.greater(pc.binary_length(rows["payload"]), inline_max_bytes), False)
    if not pc.any(large).as_py():
        return rows
    table = events_table()
    io, table_location = table.io, table.location()
    payloads = rows["payload"].to_pylist()
    uris = rows["payload_uri"].to_pylist()
    for index in pc.indices_nonzero(large).to_pylist():
        uri = blob_uri(table_location, rows["tenant"][index].as_py(), rows["event_id"][index].as_py())
        with io.new_output(uri).create(overwrite=True) as stream:
            stream.write(payloads[index])
        payloads[index], uris[index] = None, uri
    rows = _replace(rows, "payload", payloads)
    return _replace(rows, "payload_uri", uris)


def _replace(rows: pa.Table, column: str, values: list) -> pa.Table:
    field = rows.schema.field(column)
    return rows.set_column(rows.schema.get_field_index(column), field, pa.array(values, field.type))


def read_blob(io: FileIO, uri: str) -> bytes:
    with io.new_input(uri).open() as stream:
        return stream.read()


def relocate_blobs(rows: pa.Table, source: FileIO, target: FileIO, from_location: str, to_location: str) -> pa.Table:
    """Copy each blob the rows point to from under ``from_location`` to the same place under
    ``to_location`` and point the rows there (a replica gets its own copies)."""
    uris = rows["payload_uri"].to_pylist()
    if not any(uris):
        return rows
    tenants, event_ids = rows["tenant"].to_pylist(), rows["event_id"].to_pylist()
    for index, uri in enumerate(uris):
        if uri and uri.startswith(from_location):
            uris[index] = blob_uri(to_location, tenants[index], event_ids[index])
            with target.new_output(uris[index]).create(overwrite=True) as stream:
                stream.write(read_blob(source, uri))
    return _replace(rows, "payload_uri", uris)
