"""The one interface every test service implements, and the process handling they all share.

A service runs as a detached process of its own (its own session), recorded in a pid file under
``<home>/services/<name>/``, with stdout and stderr appended to a log file beside it. It is stopped by
that pid only, and only while the process still runs from this checkout's data folder.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from rtml.errors import RtmlError
from rtml.settings import Settings

# Called with a short description of the phase a service is in ("fetching", "starting", ...).
PhaseReport = Callable[[str], None]

LOG_TAIL_LINES = 15


class ServiceError(RtmlError):
    """A service could not be fetched, started or stopped; the message names it and its log file."""


class Service(ABC):
    """A real server on loopback: fetch (once), start, stop, and whether it answers a client."""

    name: str
    # The signal on which the server shuts down cleanly without waiting for its clients.
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout_s: float = 60.0

    def __init__(self, settings: Settings):
        self.settings = settings
        self.host = settings.services.host
        self.data_dir = settings.home_dir / "services" / self.name
        self.log_file = self.data_dir / f"{self.name}.log"
        self.pid_file = self.data_dir / f"{self.name}.pid"

    # --- what each service defines -------------------------------------------------------------

    # The ServicesSettings field that holds the port its clients connect to.
    port_setting: str
    # What a client is given: ``host:port`` or a URL.
    address_template: str = "{host}:{port}"

    @abstractmethod
    def fetch(self) -> None:
        """Download or install what the server needs; does nothing when it is already there."""

    @abstractmethod
    def command(self) -> list[str]:
        """Write the server's configuration (and initialise its data once); return its command line."""

    @abstractmethod
    def answers(self) -> bool:
        """Whether the server serves a real client request now (its port is known to be open)."""

    def popen_options(self) -> dict[str, Any]:
        """Extra ``subprocess.Popen`` arguments for the server process (e.g. the user to run as)."""
        return {}

    def on_ready(self) -> None:
        """One-off set-up that needs the running server (e.g. a database); must be idempotent."""

    # --- shared behaviour ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return getattr(self.settings.services, self.port_setting)

    @property
    def address(self) -> str:
        return self.address_template.format(host=self.host, port=self.port)

    def pid(self) -> int | None:
        """The server's process id while it runs from this checkout's data folder, else None."""
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        # A stale pid file may name a pid that now belongs to an unrelated process: never touch that.
        if is_running(pid) and str(self.data_dir) in process_command_line(pid):
            return pid
        return None

    def is_healthy(self) -> bool:
        if not port_open(self.host, self.port):
            return False
        try:
            return self.answers()
        except Exception:  # noqa: BLE001 - a starting server fails in client-specific ways; all mean "not yet"
            return False

    def start(self) -> None:
        """Start the server unless it already runs; returns without waiting for it to answer."""
        self.fetch()
        if self.pid() is not None:
            return
        if port_open(self.host, self.port):
            raise ServiceError(
                f"{self.name} cannot start: {self.host}:{self.port} is taken by another program that does not "
                f"answer as {self.name}. Stop it, or move {self.name} with RTML_SERVICES__{self.port_setting.upper()}."
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = self.command()
        with self.log_file.open("ab") as log:
            log.write(f"\n=== rtml {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.popen_options(),
            )
        self.pid_file.write_text(str(process.pid))

        # Popen returns while the kernel may still be switching the child to the new program, whose
        # command line pid() checks; wait for that (or an immediate exit, which wait_until_healthy reports).
        def exec_done() -> bool:
            return process.poll() is not None or str(self.data_dir) in process_command_line(process.pid)

        poll_until(exec_done, 5, 0.01)

    def wait_until_healthy(self, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or self.settings.services.start_timeout_s

        def answered() -> bool:
            if self.pid() is None:
                raise ServiceError(f"{self.name} exited while starting.\n{self.log_excerpt()}")
            return self.is_healthy()

        if not poll_until(answered, timeout_s, 0.5):
            raise ServiceError(
                f"{self.name} did not answer at {self.address} within {timeout_s:.0f} s.\n{self.log_excerpt()}"
            )
        self.on_ready()

    def stop(self) -> bool:
        """Stop the server started from here; False when none was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)  # stale: its process is gone
            return False
        os.kill(pid, self.stop_signal)
        if not wait_for_exit(pid, self.stop_timeout_s):
            os.killpg(pid, signal.SIGKILL)
            if not wait_for_exit(pid, 10):
                raise ServiceError(f"{self.name} (pid {pid}) did not stop, even on SIGKILL.")
        self.pid_file.unlink(missing_ok=True)
        return True

    def restart(self) -> None:
        """Stop and start again, keeping its data; returns once it answers."""
        self.stop()
        self.start()
        self.wait_until_healthy()

    def ensure_up(self, report: PhaseReport) -> str:
        """Fetch, start and wait until it answers; a no-op for a server that answers already."""
        if self.is_healthy():
            return "already up" if self.pid() else "already answering (not started from this checkout)"
        report("fetching")
        self.fetch()
        report("starting" if self.pid() is None else "waiting for the running process")
        self.start()
        report("waiting until it answers")
        self.wait_until_healthy()
        return "started"

    def log_excerpt(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except FileNotFoundError:
            return f"(no log file at {self.log_file})"
        return f"Last lines of {self.log_file}:\n" + "\n".join(f"  {line}" for line in lines)


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def is_running(pid: int) -> bool:
    try:
        # Reap it if it is an exited child of ours (restart() inside a test process): a zombie has exited.
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    return poll_until(lambda: not is_running(pid), timeout_s, 0.2)


def poll_until(condition: Callable[[], bool], timeout_s: float, interval_s: float) -> bool:
    """Call ``condition`` until it holds (True) or ``timeout_s`` passes (False); its exceptions propagate."""
    polling = Retrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_fixed(interval_s),
        retry=retry_if_result(lambda holds: not holds),
        retry_error_callback=lambda _: False,
    )
    return polling(condition)
