"""`rtml services up | down | status`: the real servers the tests talk to, on loopback."""

import typer

from rtml.errors import NotImplementedYet

app = typer.Typer(help="Start, stop and inspect the local test services.", no_args_is_help=True)


@app.command()
def up() -> None:
    """Fetch (once) and start Kafka, Neo4j, Elasticsearch, Prometheus and PostgreSQL."""
    raise NotImplementedYet("services up", "foundation")
