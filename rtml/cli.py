"""The `rtml` command line (also `python -m rtml`).

This is the entry-point layer: it is the one kernel module that reaches up into the other
packages, and each package keeps its own commands in its own ``cli.py`` (imports of heavy
libraries stay inside the command functions so that ``rtml --help`` is instant).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from agents.cli import agents_app, graph_app
from api.cli import app as api_app
from api.cli import erase, query, token_app
from cluster.cli import app as services_app
from deployments.cli import demo, down, nab_app, up
from lakehouse.cli import app as lakehouse_app
from models.cli import train as train_command
from observability.cli import logs
from rtml.errors import RtmlError
from security.cli import app as certs_app

app = typer.Typer(
    name="rtml",
    help="rtml: a real-time machine-learning serving cluster on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(services_app, name="services")
app.add_typer(api_app, name="api")
app.add_typer(token_app, name="token")
app.command()(query)
app.add_typer(nab_app, name="nab")
app.add_typer(agents_app, name="agents")
app.add_typer(graph_app, name="graph")
app.command("train")(train_command)

bench_app = typer.Typer(help="Side-by-side benchmarks; figures go to benchmarks/RESULTS.md.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

app.add_typer(lakehouse_app, name="lakehouse")
app.command()(erase)
app.command()(demo)
app.command()(up)
app.command()(down)
app.add_typer(certs_app, name="certs")
app.command()(logs)


@bench_app.command("serve")
def bench_serve(
    seconds: float = typer.Option(15.0, help="Measured seconds per point (after a warm-up)."),
    concurrency: list[int] = typer.Option([1, 16, 64], help="Concurrent HTTP clients (repeat the option)."),
    ray_env: list[str] = typer.Option(["default", "throughput", "haproxy"], help="Ray Serve configurations to run (b) and (c) under: default, throughput, haproxy, haproxy+ray-tls."),
    binary_windows: int = typer.Option(1024, help="Windows per .npy request for rtml's binary form (0: skip)."),
    write: bool = typer.Option(False, "--write", help="Write the table into benchmarks/RESULTS.md."),
    tls: bool = typer.Option(False, "--tls", help="Also measure rtml through the TLS entry (mutual TLS) under the same load."),
) -> None:
    """Raw torch vs a stock Ray Serve app vs rtml, at concurrency 1, 16 and 64."""
    from benchmarks.serve import main as serve_benchmark

    serve_benchmark(seconds, concurrency, ray_env, binary_windows, write, Console(), tls)


@bench_app.command("stream")
def bench_stream(
    events: int = typer.Option(100_000, help="Events for the throughput runs (a) and (b)."),
    rate: float = typer.Option(2000.0, help="Offered events/s for the latency run (c)."),
    seconds: float = typer.Option(30.0, help="How long the latency run offers events."),
    consumers: int = typer.Option(2, help="rtml consumer actors."),
    write: bool = typer.Option(False, "--write", help="Write the figures into benchmarks/RESULTS.md."),
    observability_overhead: bool = typer.Option(
        False, "--observability-overhead", help="Instead: rtml's path (b) with metrics and 1% tracing off and on, alternately (--events, --consumers, --rounds)."
    ),
    rounds: int = typer.Option(3, help="--observability-overhead: measurements of each of off and on."),
) -> None:
    """Raw kafka-python consumption vs rtml's full streaming path, on one Kafka broker."""
    from rtml.settings import get_settings
    from streaming.sources.kafka import require_kafka

    require_kafka(get_settings().kafka)
    if observability_overhead:
        from benchmarks.observability import main as overhead_benchmark

        overhead_benchmark(events, consumers, rounds, Console())
        return
    from benchmarks.stream import main as stream_benchmark

    stream_benchmark(events, rate, seconds, consumers, write, Console())


@bench_app.command("agents")
def bench_agents(
    rate: float = typer.Option(5.0, help="New incidents offered per second."),
    seconds: float = typer.Option(60.0, help="How long to offer them."),
    write: bool = typer.Option(False, "--write", help="Write the figures into benchmarks/RESULTS.md."),
) -> None:
    """Anomaly -> enrichment stored through the agent graph on the embedded backends."""
    from benchmarks.agents import main as agents_benchmark

    agents_benchmark(rate, seconds, write, Console())


@bench_app.command("lakehouse")
def bench_lakehouse(
    commits: int = typer.Option(600, help="Idempotent appends to make, one after another."),
    rows: int = typer.Option(2000, help="Event rows per append."),
    write: bool = typer.Option(False, "--write", help="Write the figures into benchmarks/RESULTS.md."),
) -> None:
    """The cost of one idempotent append as a table's snapshot history grows."""
    from benchmarks.lakehouse import main as lakehouse_benchmark

    lakehouse_benchmark(commits, rows, write, Console())


@bench_app.command("validation")
def bench_validation(
    batch: int = typer.Option(2000, help="Events per batch (the consumer's max_poll_records)."),
    repeats: int = typer.Option(30, help="Repeats per figure; the best is reported."),
    write: bool = typer.Option(False, "--write", help="Write the figures into benchmarks/RESULTS.md."),
) -> None:
    """What the kernel's one event validation costs per event on the stream's path."""
    from benchmarks.validation import main as validation_benchmark

    validation_benchmark(batch, repeats, write, Console())


@bench_app.command("api")
def bench_api(
    demo_home: Path = typer.Option(None, help="The demo's home whose lakehouse GraphQL reads (default: <home>/demo, which `rtml demo` writes)."),
    clients: int = typer.Option(8, help="Concurrent HTTP clients of the full-speed ingestion run."),
    seconds: float = typer.Option(15.0, help="Measured seconds of each ingestion run (full speed, then half of it offered)."),
    batch: int = typer.Option(500, help="Events per JSON batch."),
    repeats: int = typer.Option(50, help="Repeats of each GraphQL query (and of its direct read)."),
    rounds: int = typer.Option(10, help="Rounds of spiked events (one per second) under the anomalies subscription."),
    write: bool = typer.Option(False, "--write", help="Write the figures into benchmarks/RESULTS.md."),
) -> None:
    """Ingestion events/s, GraphQL p50/p99 on the demo's lakehouse and subscription latency, through the Serve app."""
    from benchmarks.api import main as api_benchmark

    api_benchmark(demo_home, clients, seconds, batch, repeats, rounds, write, Console())


def main() -> None:
    console = Console(stderr=True)
    try:
        app()
    except RtmlError as error:
        console.print(f"[bold red]error:[/] {error}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
