"""Structured logs: one JSON object per line from every rtml process (the CLI's driver, Ray actors
and tasks, Serve replicas), carrying the current trace and span ids; and the reader behind
``rtml logs``, which merges those lines from the files the processes write.

A line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``process`` (a role: "driver",
"consumer", a Serve deployment such as "Ingress", else the Ray actor's class or the task's
function), ``pid``, ``trace_id`` and ``span_id`` (while an OpenTelemetry span is current),
``message``, every ``extra=`` field (tenant, group, ...), and ``exception`` / ``stack`` when the
record has them. ``observability.json_logs = false`` gives the same fields as one line of text.

Every Ray worker process logs this way through Ray's ``worker_process_setup_hook``
(``ray_runtime_env``), which runs ``configure_logging`` in each worker before any actor, task or
replica code. Ray's own ``ray.LoggingConfig(encoding="JSON")`` and Serve's
``LoggingConfig(encoding="JSON")`` were not used: neither can add the OpenTelemetry trace and span
ids or our process roles (their formatters take only a fixed list of LogRecord attributes and Ray's
ids), and Serve's applies only to its own ``ray.serve`` logger, which does not propagate, while
rtml's modules log under their own names. The hook installs our formatter on the root logger, so
those modules' records reach it, and it is a handler ``security.pii.redact_logs`` filters as it
filters any other.
"""

from __future__ import annotations

import heapq
import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
from opentelemetry import trace
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

from rtml.settings import Settings

# Ray runs this in every worker process it starts for a job with ``ray_runtime_env``'s fragment:
# a module path, not a function object, so that it holds for detached actors (Serve's controller
# and replicas) that outlive the driver that started them.
WORKER_SETUP_HOOK = "observability.logs.setup_worker_logging"
# The settings the hook reads in a worker, pinned to the driver's values by ``ray_runtime_env``.
JSON_LOGS_ENV = "RTML_OBSERVABILITY__JSON_LOGS"
LOG_LEVEL_ENV = "RTML_OBSERVABILITY__LOG_LEVEL"
# A driver's own log file (``configure_logging(..., log_file=True)``): rotated, so that a
# long-running `rtml up` or demo keeps a bounded history that `rtml logs` reads.
LOG_FILE_MAX_BYTES = 64 * 1024 * 1024
LOG_FILE_BACKUPS = 3
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
# The fields this module writes, in their order (trace ids, exception and stack only when there);
# any other key of a line is one of the record's extras.
STANDARD_FIELDS = ("time", "level", "logger", "process", "pid", "trace_id", "span_id", "message", "exception", "stack")

_process_role: str | None = None  # set by configure_logging; None: found from Ray's context
_actor_role: str | None = None  # a Ray actor's role, fixed for the life of its process


# what a line says -----------------------------------------------------------------------------


def trace_ids() -> dict[str, str]:
    """The current OpenTelemetry span's trace id (32 hex digits) and span id (16), or nothing when
    no valid span is current."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": trace.format_trace_id(context.trace_id), "span_id": trace.format_span_id(context.span_id)}


def process_role() -> str:
    """The role this process logs under: the one ``configure_logging`` was given; in a Ray worker
    without one, the Serve deployment it serves, else its actor's class, else the function of the
    task it runs; elsewhere the program's name."""
    if _process_role:
        return _process_role
    return _ray_role() or Path(sys.argv[0]).name or "python"


def _ray_role() -> str | None:
    global _actor_role
    if _actor_role:
        return _actor_role
    ray = sys.modules.get("ray")  # not imported: not a Ray worker (and no import cost per record)
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:  # a driver names itself through configure_logging
        return None
    # "Class.method" on an actor's threads, the function's name in a task; None on threads the
    # user code started (nothing to learn the role from there until an actor task logs).
    task = context.get_task_name()
    if not task:
        return "ray-worker"
    if context.get_actor_id() is None:
        return task  # a task: the worker runs other tasks later, so nothing is kept
    actor_class = task.split(".", 1)[0]
    # Serve names a replica's actor class "ServeReplica:<app>:<deployment>".
    _actor_role = actor_class.rsplit(":", 1)[-1] if actor_class.startswith("ServeReplica:") else actor_class
    return _actor_role


def _utc_iso(created: float) -> str:
    return datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="microseconds")


class JsonLogFormatter(OrjsonFormatter):
    """One JSON object per record (python-json-logger, orjson): the fields of this module's
    docstring. An exception is written as the record's ``exc_text`` when a filter already set it
    (``security.pii.RedactingFilter`` redacts it there), so redaction holds for tracebacks too."""

    def __init__(self) -> None:
        super().__init__(
            ["message"],
            rename_fields={"exc_info": "exception", "stack_info": "stack"},
            # Ray's record factory adds a private timestamp attribute; taskName is asyncio's.
            reserved_attrs=[*RESERVED_ATTRS, "taskName", "_ray_timestamp_ns"],
        )

    def format(self, record: logging.LogRecord) -> str:
        # python-json-logger formats exc_info afresh; logging's convention is that a set exc_text
        # is the exception's text (a filter may have redacted it), so hand it that instead.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        exc_info, record.exc_info = record.exc_info, None
        try:
            return super().format(record)
        finally:
            record.exc_info = exc_info

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = _utc_iso(record.created)
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["process"] = process_role()
        log_data["pid"] = record.process
        log_data.update(trace_ids())
        super().add_fields(log_data, record, message_dict)


class TextLogFormatter(logging.Formatter):
    """The JSON line's fields as one line of text (``observability.json_logs = false``), then the
    exception's (already redacted) text."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{key}={value}" for key, value in {**_extras(record), **trace_ids()}.items())
        return (
            f"{_utc_iso(record.created)} {record.levelname} {process_role()}[{record.process}] {record.name}: "
            f"{record.message}{' ' + extras if extras else ''}"
        )


_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items() if key not in _RECORD_ATTRS and not key.startswith("_")}


# configuring a process ------------------------------------------------------------------------


_Handler = TypeVar("_Handler", bound=logging.Handler)


class RtmlLogHandler(logging.StreamHandler):
    """The root handler ``configure_logging`` installs: the process's original stderr (Serve
    replaces ``sys.stderr`` in replicas; the worker's .err file is what `rtml logs` reads)."""

    def __init__(self) -> None:
        super().__init__(sys.__stderr__ or sys.stderr)


class RtmlLogFileHandler(logging.handlers.RotatingFileHandler):
    """A driver's own JSON log file under ``<home>/logs`` (``configure_logging(log_file=True)``)."""


def log_level(settings: Settings) -> int:
    """``observability.log_level`` as logging's number; a ValueError naming the allowed names."""
    name = settings.observability.log_level.upper()
    if name not in LEVELS:
        raise ValueError(f"observability.log_level is {settings.observability.log_level!r}: use one of {', '.join(LEVELS)} (RTML_OBSERVABILITY__LOG_LEVEL)")
    return LEVELS[name]


def driver_logs_dir(settings: Settings) -> Path:
    """Where drivers write their own log files (``<home>/logs``), which `rtml logs` also reads."""
    return settings.home_dir / "logs"


def configure_logging(settings: Settings, process: str | None, *, log_file: bool = False) -> RtmlLogHandler:
    """Have this process log through the root logger at ``observability.log_level``, on stderr, as
    JSON lines (or text when ``observability.json_logs`` is false), under the role ``process``
    (None: keep the one set before, or find it from Ray's context). With ``log_file``, JSON lines
    also go to ``<home>/logs/<process>.log`` (rotated).

    Idempotent: a second call updates the installed handlers in place, so the filters other code
    put on them (``security.pii.redact_logs``) stay; a handler added after such filters were
    installed gets the same redaction filters as the root's other handlers. Handlers other code
    added to the root are left as they are. Returns the stderr handler."""
    global _process_role
    level = log_level(settings)
    if process:
        _process_role = process
    root = logging.getLogger()
    handler = _installed(root, RtmlLogHandler) or _add(root, RtmlLogHandler())
    handler.setFormatter(JsonLogFormatter() if settings.observability.json_logs else TextLogFormatter())
    if log_file:
        if not process and not _process_role:
            raise ValueError("configure_logging(log_file=True) needs a process name: the file is <home>/logs/<process>.log")
        if _installed(root, RtmlLogFileHandler) is None:
            path = driver_logs_dir(settings) / f"{process or _process_role}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            file_handler = _add(root, RtmlLogFileHandler(path, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"))
            file_handler.setFormatter(JsonLogFormatter())  # always JSON: `rtml logs` reads it
    root.setLevel(level)
    return handler


def _installed(root: logging.Logger, kind: type[_Handler]) -> _Handler | None:
    return next((handler for handler in root.handlers if isinstance(handler, kind)), None)


def _add(root: logging.Logger, handler: _Handler) -> _Handler:
    # redact_logs filters the handlers there were when it ran; one added later gets the same.
    if any(other.filters for other in root.handlers):  # else no need to import security.pii
        from security.pii import RedactingFilter

        redacting = next((f for other in root.handlers for f in other.filters if isinstance(f, RedactingFilter)), None)
        if redacting is not None:
            handler.addFilter(redacting)
    root.addHandler(handler)
    return handler


def ray_runtime_env(settings: Settings, env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``runtime_env`` for ``ray.init`` that has every worker process of the job (actors,
    tasks, Serve replicas, which inherit it) log as ``configure_logging`` does, at this process's
    level and format; ``env_vars`` (e.g. Serve's throughput mode) are kept beside the ones it adds."""
    return {
        "worker_process_setup_hook": WORKER_SETUP_HOOK,
        "env_vars": {
            **(env_vars or {}),
            JSON_LOGS_ENV: "true" if settings.observability.json_logs else "false",
            LOG_LEVEL_ENV: settings.observability.log_level,
        },
    }


def setup_worker_logging() -> None:
    """Ray's ``worker_process_setup_hook`` (``ray_runtime_env``): ``configure_logging`` with this
    process's settings, its role found from Ray's context as it logs."""
    from rtml.settings import get_settings

    configure_logging(get_settings(), None)


# reading them back: `rtml logs` ----------------------------------------------------------------


@dataclass(frozen=True)
class LogLine:
    """One line of a log file: an rtml record (``record`` set) or anything else a process wrote
    (Ray's own prints, tracebacks of crashed workers: ``record`` None)."""

    time: datetime
    text: str
    record: dict[str, Any] | None
    source: Path


@dataclass(frozen=True)
class LogFilter:
    """Which lines `rtml logs` shows. A line that is not a record carries no level, trace, tenant
    or process: it is shown only with ``include_raw`` and none of those four filters set."""

    level: int | None = None  # at least this level
    trace: str | None = None  # trace id, or a prefix of it
    tenant: str | None = None
    processes: frozenset[str] = frozenset()
    since: datetime | None = None
    include_raw: bool = False

    def accepts(self, line: LogLine) -> bool:
        if self.since is not None and line.time < self.since:
            return False
        record = line.record
        if record is None:
            return self.include_raw and self.level is None and not self.trace and not self.tenant and not self.processes
        return (
            (self.level is None or LEVELS.get(str(record.get("level", "")).upper(), logging.NOTSET) >= self.level)
            and (not self.trace or str(record.get("trace_id", "")).startswith(self.trace.lower()))
            and (not self.tenant or record.get("tenant") == self.tenant)
            and (not self.processes or record.get("process") in self.processes)
        )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``--since``: a duration back from now (``90s``, ``10m``, ``2h``, ``1d``) or an ISO 8601
    time (UTC when it names no zone). A ValueError says what is accepted."""
    now = now or datetime.now(UTC)
    duration = _DURATION.match(value)
    if duration:
        return now - timedelta(**{_UNITS[duration.group(2)]: float(duration.group(1))})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since {value!r} is neither a duration (90s, 10m, 2h, 1d) nor an ISO 8601 time (2026-12-05T10:00:00)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_level(name: str) -> int:
    """``--level``: a level's name; a ValueError lists them."""
    try:
        return LEVELS[name.upper()]
    except KeyError:
        raise ValueError(f"--level {name!r}: use one of {', '.join(LEVELS)}") from None


def ray_temp_dir(settings: Settings) -> Path:
    """Ray's temp dir for the local cluster: ``--temp-dir`` in ``serving.ray_start_args`` when
    `rtml up` is told one, else Ray's default (``$RAY_TMPDIR``, else ``$TMPDIR``, else /tmp, then
    ``ray``)."""
    args = settings.serving.ray_start_args
    for index, arg in enumerate(args):
        if arg.startswith("--temp-dir="):
            return Path(arg.split("=", 1)[1])
        if arg == "--temp-dir" and index + 1 < len(args):
            return Path(args[index + 1])
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray"


def ray_session_logs(settings: Settings) -> Path:
    """The logs directory of the latest Ray session on this machine."""
    return ray_temp_dir(settings) / "session_latest" / "logs"


# Ray moves a dead worker's files to old/.
RAY_LOG_PATTERNS = ("worker-*.err", "worker-*.out", "old/worker-*.err", "old/worker-*.out", "serve/*.log")
DRIVER_LOG_PATTERNS = ("*.log", "*.log.[0-9]*")


def log_files(ray_logs: Path, driver_logs: Path) -> list[Path]:
    """The files rtml's processes log to: in a Ray session's logs directory, the workers' stdout
    and stderr (``worker-*.out``, ``worker-*.err``, also those of dead workers in ``old/``) and
    Serve's (``serve/*.log``), not Ray's own daemons' logs; in the drivers' directory, their files and the rotated ``*.log.N``."""
    found = {path for pattern in RAY_LOG_PATTERNS for path in ray_logs.glob(pattern)}
    found.update(path for pattern in DRIVER_LOG_PATTERNS for path in driver_logs.glob(pattern))
    return sorted(path for path in found if path.is_file())


def parse_line(text: str, source: Path, fallback_time: datetime) -> LogLine:
    """A line as a record when it is one of rtml's JSON lines (an object with ``time`` and
    ``level``), else as a line of other output at ``fallback_time``."""
    if text.startswith("{"):
        try:
            record = orjson.loads(text)
            if isinstance(record, dict) and "level" in record and isinstance(record.get("time"), str):
                moment = datetime.fromisoformat(record["time"])
                return LogLine(moment if moment.tzinfo else moment.replace(tzinfo=UTC), text, record, source)
        except ValueError:  # not JSON (orjson.JSONDecodeError is one), or a time that is not ISO 8601
            pass
    return LogLine(fallback_time, text, None, source)


@dataclass
class _FileCursor:
    """Where reading one file stopped, so that following it reads only what was appended."""

    path: Path
    offset: int = 0
    last_time: datetime | None = None
    pending: list[str] = field(default_factory=list)  # other output before this file's first record

    def read(self, keep: LogFilter) -> list[LogLine]:
        """The complete lines appended since the last read that ``keep`` accepts, in file order.
        Other output takes the time of the record before it in the file; before the file's first
        record, that of the first record (or the file's modification time while there is none)."""
        try:
            size = self.path.stat().st_size
            if size < self.offset:  # truncated: start over
                self.offset, self.pending = 0, []
            with self.path.open("rb") as stream:
                stream.seek(self.offset)
                chunk = stream.read()
            modified = datetime.fromtimestamp(self.path.stat().st_mtime, tz=UTC)
        except FileNotFoundError:  # rotated away between listing and reading
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a partial last line is read once it is whole
        self.offset += len(complete)
        lines: list[LogLine] = []
        for raw in complete.decode("utf-8", errors="replace").splitlines():
            if not raw.strip():
                continue
            line = parse_line(raw, self.path, self.last_time or modified)
            if line.record is None:
                if self.last_time is None:
                    if keep.include_raw:
                        self.pending.append(raw)
                    continue
            else:
                if self.pending:
                    lines.extend(LogLine(line.time, text, None, self.path) for text in self.pending)
                    self.pending = []
                self.last_time = line.time
            lines.append(line)
        if self.pending:
            lines.extend(LogLine(modified, text, None, self.path) for text in self.pending)
            self.pending = []
        return [line for line in lines if keep.accepts(line)]


class LogReader:
    """Reads the log files of ``log_files``, merged by time: ``read()`` all that is there now,
    then again only what was appended (and files that appeared) since."""

    def __init__(self, ray_logs: Path, driver_logs: Path, keep: LogFilter):
        self._ray_logs, self._driver_logs = ray_logs, driver_logs
        self._keep = keep
        # By inode, not path: a file Ray moves to old/ or a rotated driver log is read on from
        # where it was, not again from its start.
        self._cursors: dict[tuple[int, int], _FileCursor] = {}

    def read(self) -> list[LogLine]:
        """The lines written since the last read that the filter accepts, oldest first (each
        file's lines keep their order among equal times)."""
        cursors: dict[tuple[int, int], _FileCursor] = {}
        for path in log_files(self._ray_logs, self._driver_logs):
            try:
                identity = path.stat()
            except FileNotFoundError:  # moved or rotated since it was listed: found at its new path
                continue
            key = (identity.st_dev, identity.st_ino)
            cursors[key] = self._cursors.get(key) or _FileCursor(path)
            cursors[key].path = path
        self._cursors = cursors  # deleted files are forgotten
        return list(heapq.merge(*(cursor.read(self._keep) for cursor in self._cursors.values()), key=lambda line: line.time))

    def follow(self, emit: Callable[[LogLine], None], poll_s: float, stopped: Callable[[float], bool]) -> None:
        """Emit every line there is, then the lines appended later, until ``stopped(poll_s)`` (which
        waits up to ``poll_s`` seconds, e.g. ``threading.Event.wait``) is true."""
        while True:
            for line in self.read():
                emit(line)
            if stopped(poll_s):
                return

