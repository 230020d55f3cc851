"""The models' commands: `rtml nab score`, `rtml nab --offline` (the detector over a NAB corpus in
this process, without the stream) and `rtml train`; `rtml nab` itself runs the stream and lives
with the commands that wire the stream to the Serve app (``deployments.cli``). Heavy imports stay
inside the functions so that `rtml --help` is instant."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

def nab_offline(data: Path, out: Path, workers: int, seed: int) -> None:
    """The detector over every series of a NAB-layout directory, in this process (Ray tasks)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from models.detector import DetectorConfig
    from models.nab.runner import find_series, run_corpus

    total = len(find_series(data))
    started = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True)
    ) as progress:
        task = progress.add_task("detecting (offline)", total=total)
        run_corpus(data, out, config=DetectorConfig(seed=seed), workers=workers or None, on_done=lambda name: progress.advance(task))
    Console().print(f"wrote {total} result files to {out} in {time.perf_counter() - started:.0f} s")


def nab_score(
    results: Path = typer.Option(..., help="Directory written by `rtml nab --out`."),
    labels: Path = typer.Option(..., help="NAB label windows JSON (combined_windows.json)."),
    report: Optional[Path] = typer.Option(None, help="Also write the figures as JSON here."),
    category: list[str] = typer.Option(
        [], help="Score only this category's files (repeatable): a split, with its threshold optimised on it alone."
    ),
) -> None:
    """Score result files with NAB's rules: one corpus-wide threshold per profile, normalised 0-100."""
    from rich.table import Table

    from models.nab.scorer import load_results, score_corpus

    files, total_windows = load_results(results, labels, category)
    outcomes = score_corpus(files, total_windows)
    table = Table("profile", "score", "threshold", "raw", "null", "perfect", title=f"NAB scores of {results}" + (f" ({', '.join(category)})" if category else ""))
    for result in outcomes:
        table.add_row(
            result.profile.name,
            f"{result.normalized:.2f}",
            f"{result.threshold:.6f}",
            f"{result.raw:.3f}",
            f"{result.null:.1f}",
            f"{result.perfect:.1f}",
        )
    Console().print(table)
    if report is not None:
        report.write_text(
            json.dumps({r.profile.name: {"score": r.normalized, "threshold": r.threshold} for r in outcomes}, indent=2)
        )


def train(
    tenant: str = typer.Option(..., help="Tenant whose metric events to train on."),
    model: str = typer.Option("rnn", "--model", help="Network kind: rnn, cnn or hybrid."),
    epochs: int = typer.Option(0, help="Training epochs; 0 = settings (train.epochs)."),
) -> None:
    """Train a model for a tenant from the lakehouse (a Ray job) and register a candidate."""
    from models.training import train_candidate

    console = Console()
    with console.status("starting") as status:
        version = train_candidate(tenant, model, epochs=epochs or None, on_step=lambda step: status.update(step))
    metrics = ", ".join(f"{name} {value:.4g}" for name, value in sorted(version.metrics.items()))
    console.print(f"registered candidate {version.key} ({version.kind}) at {version.artifact_uri}\n{metrics}")
