"""``benchmarks/RESULTS.md``: each benchmark owns one section between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` markers, which ``--write`` replaces in place; what stands outside the markers
(the hand-written readings) is never touched."""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS_FILE = Path(__file__).with_name("RESULTS.md")


def write_section(name: str, text: str) -> None:
    """Replace the section ``name`` (appended at the end when the file has none yet)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    current = RESULTS_FILE.read_text() if RESULTS_FILE.exists() else "# Benchmark results\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    RESULTS_FILE.write_text(current)


def machine() -> str:
    """The machine a figure was taken on, with its load when the run started (it is shared)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.machine()}, {os.cpu_count()} cores, load average at start {load}, Python {platform.python_version()}"
