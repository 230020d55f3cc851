"""PostgreSQL from Debian's packages, for the PostgreSQL-backed Iceberg SQL catalog.

The cluster is initialised under the data folder with ``initdb`` and run by the ``postgres`` binary
itself (no pg_ctlcluster/systemd); as root it runs as the ``postgres`` user, which owns its data.
Authentication is ``trust``: it listens on loopback only, for tests.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

from cluster.services import debian
from cluster.services.base import Service, ServiceError

SERVER_BINARIES = Path("/usr/lib/postgresql")
# Root may not run the server; Debian's package creates this user for it.
SYSTEM_USER = "postgres"
USER = "rtml"
DATABASE = "rtml"


class Postgres(Service):
    name = "postgres"
    port_setting = "postgres_port"
    # A SQLAlchemy URL, as pyiceberg's SQL catalog takes it.
    address_template = f"postgresql+psycopg2://{USER}@{{host}}:{{port}}/{DATABASE}"
    # SIGTERM would wait for every client to disconnect; SIGINT is PostgreSQL's "fast" shutdown.
    stop_signal = signal.SIGINT

    @property
    def cluster_dir(self) -> Path:
        return self.data_dir / "cluster"

    def fetch(self) -> None:
        if _server_bin_dir() is None:
            debian.install(["postgresql"])

    def popen_options(self) -> dict[str, Any]:
        return {"user": SYSTEM_USER} if os.geteuid() == 0 else {}

    def command(self) -> list[str]:
        bin_dir = _server_bin_dir()
        if bin_dir is None:
            raise ServiceError(f"No PostgreSQL server under {SERVER_BINARIES}/*/bin; is `postgresql` installed?")
        if not (self.cluster_dir / "PG_VERSION").is_file():
            self._initdb(bin_dir)
        return [
            str(bin_dir / "postgres"),
            "-D", str(self.cluster_dir),
            "-c", f"listen_addresses={self.host}",
            "-c", f"port={self.port}",
            # TCP only: a socket path under a deep data folder can exceed the 107-byte limit of Unix sockets.
            "-c", "unix_socket_directories=",
        ]  # fmt: skip

    def answers(self) -> bool:
        with self._connect("postgres") as connection, connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            return cursor.fetchone() == (1,)

    def on_ready(self) -> None:
        connection = self._connect("postgres")
        try:
            # CREATE DATABASE cannot run inside a transaction.
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            connection.close()

    def _connect(self, database: str):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=USER, dbname=database, connect_timeout=3)

    def _initdb(self, bin_dir: Path) -> None:
        self.cluster_dir.mkdir(parents=True, exist_ok=True)
        self.cluster_dir.chmod(0o700)
        if os.geteuid() == 0:
            system_user = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.cluster_dir, system_user.pw_uid, system_user.pw_gid)
        command = [
            str(bin_dir / "initdb"), "--pgdata", str(self.cluster_dir), "--username", USER,
            "--auth", "trust", "--encoding", "UTF8", "--locale", "C",
        ]  # fmt: skip
        with self.log_file.open("ab") as log:
            result = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir, **self.popen_options()
            )
        if result.returncode != 0:
            raise ServiceError(f"initdb failed for {self.cluster_dir}.\n{self.log_excerpt()}")


def _server_bin_dir() -> Path | None:
    """The newest installed PostgreSQL server's bin folder (Debian keeps each major version apart)."""
    candidates = [path.parent for path in SERVER_BINARIES.glob("*/bin/postgres")]
    if not candidates:
        return None
    return max(candidates, key=lambda bin_dir: int(re.sub(r"\D", "", bin_dir.parent.name) or 0))
