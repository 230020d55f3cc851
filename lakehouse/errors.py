"""Errors the lakehouse raises for people: each names the table and what to do."""

from rtml.errors import RtmlError


class LakehouseError(RtmlError):
    """Bad input to, or an unusable state of, the lakehouse."""


class TableMetadataError(LakehouseError):
    """A table's Iceberg metadata is missing or unreadable."""

    def __init__(self, table: str, location: str | None, cause: BaseException):
        where = f" at {location}" if location else ""
        super().__init__(
            f"table {table!r}: its Iceberg metadata{where} is missing or corrupt ({type(cause).__name__}: {cause}). "
            "Restore the metadata folder from a backup, or recover the table from a replica made with "
            "`rtml lakehouse replicate`."
        )
        self.table = table
        self.location = location
