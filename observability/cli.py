"""`rtml logs`: the structured log lines of the local cluster's processes, merged by time."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from observability.logs import LogLine

LEVEL_STYLES = {"DEBUG": "dim", "INFO": "green", "WARNING": "yellow", "ERROR": "red", "CRITICAL": "bold red"}
FOLLOW_POLL_S = 0.5


def logs(
    level: Annotated[str | None, typer.Option(help="Only records at this level or above: DEBUG, INFO, WARNING, ERROR, CRITICAL.")] = None,
    trace: Annotated[str | None, typer.Option(help="Only records of this trace (its 32-hex-digit id, or a prefix of it).")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only records about this tenant.")] = None,
    process: Annotated[list[str] | None, typer.Option(help="Only records of this process role (driver, consumer, Ingress, ...); repeat for several.")] = None,
    since: Annotated[str | None, typer.Option(help="Only lines since then: a duration back from now (90s, 10m, 2h, 1d) or an ISO 8601 time (UTC unless it says).")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing lines as they are written (Ctrl-C ends).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records' JSON lines as they are (records only).")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="Also print lines that are not rtml records (Ray's own output), when no level, trace, tenant or process filter is set.")] = False,
    ray_logs: Annotated[Path | None, typer.Option(help="The Ray session's logs directory (default: session_latest/logs under Ray's temp dir).")] = None,
) -> None:
    """The JSON log lines of the local cluster (Ray workers, Serve replicas, drivers under <home>/logs), merged by time."""
    from observability.logs import LogFilter, LogReader, driver_logs_dir, parse_level, parse_since, ray_session_logs
    from rtml.errors import RtmlError
    from rtml.settings import get_settings

    settings = get_settings()
    try:
        keep = LogFilter(
            level=parse_level(level) if level else None,
            trace=trace,
            tenant=tenant,
            processes=frozenset(process or ()),
            since=parse_since(since) if since else None,
            include_raw=show_all and not as_json,
        )
    except ValueError as error:
        raise RtmlError(str(error)) from None
    session_logs, driver_logs = ray_logs or ray_session_logs(settings), driver_logs_dir(settings)
    if not session_logs.is_dir() and not driver_logs.is_dir():
        raise RtmlError(f"no logs found: neither {session_logs} nor {driver_logs} exists (start the cluster with `rtml up`, or pass --ray-logs)")
    reader = LogReader(session_logs, driver_logs, keep)
    console = Console(highlight=False, soft_wrap=True)

    def emit(line: LogLine) -> None:
        if as_json:
            sys.stdout.write(line.text + "\n")
            sys.stdout.flush()
        else:
            console.print(render(line))

    if not follow:
        for line in reader.read():
            emit(line)
        return
    try:
        reader.follow(emit, FOLLOW_POLL_S, threading.Event().wait)
    except KeyboardInterrupt:  # how following ends
        pass


def render(line: LogLine) -> Text:
    """A line for the terminal: time, level, process[pid], logger, message, extras, trace id,
    then the exception's text; other output dimmed, after its file's name."""
    from observability.logs import STANDARD_FIELDS

    stamp = line.time.strftime("%m-%d %H:%M:%S.%f")[:-3]
    record = line.record
    if record is None:
        return Text.assemble((f"{stamp} ", "dim"), (f"{line.source.name}: ", "dim cyan"), (line.text, "dim"))
    level = str(record.get("level", ""))
    text = Text.assemble(
        (f"{stamp} ", "dim"),
        (f"{level:<8}", LEVEL_STYLES.get(level, "")),
        (f"{record.get('process', '?')}[{record.get('pid', '?')}] ", "cyan"),
        (f"{record.get('logger', '')}: ", "dim"),
        str(record.get("message", "")),
    )
    extras = [f"{key}={value}" for key, value in record.items() if key not in STANDARD_FIELDS]
    if extras:
        text.append("  " + " ".join(extras), "magenta")
    if record.get("trace_id"):
        text.append(f"  trace={record['trace_id']}", "blue")
    for key in ("exception", "stack"):
        if record.get(key):
            text.append("\n" + str(record[key]), "red" if key == "exception" else "dim")
    return text
