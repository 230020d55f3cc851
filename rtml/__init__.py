"""rtml kernel: typed settings, shared schemas, user-facing errors and the CLI."""

__version__ = "0.1.0"
