"""Install Debian packages with apt-get, for services whose binaries come from Debian (Prometheus, PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Sequence

from cluster.services.base import ServiceError

# dpkg takes one installer at a time; services fetched in parallel queue here rather than on its lock.
_APT = threading.Lock()
_index_updated = False


def install(packages: Sequence[str]) -> None:
    """Install ``packages`` (root only); called by a service when its binaries are missing."""
    global _index_updated
    with _APT:
        if os.geteuid() != 0:
            raise ServiceError(
                f"{', '.join(packages)} not installed, and installing needs root: "
                f"run `sudo apt-get install -y {' '.join(packages)}`, then `rtml services up` again."
            )
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # Another installer on the machine may hold dpkg's lock for a while: wait for it rather than fail.
        lock_wait = ["-o", "DPkg::Lock::Timeout=300"]
        steps = [] if _index_updated else [["apt-get", *lock_wait, "update", "-q"]]
        steps.append(["apt-get", *lock_wait, "install", "-y", "-q", "--no-install-recommends", *packages])
        for step in steps:
            result = subprocess.run(step, env=environment, capture_output=True, text=True)
            if result.returncode != 0:
                raise ServiceError(f"`{' '.join(step)}` failed:\n{(result.stdout + result.stderr)[-2000:]}")
        _index_updated = True
