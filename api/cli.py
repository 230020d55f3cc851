"""`rtml api schema` (``app``: the ``api`` command group) and `rtml query` (``query``). Heavy imports
stay inside the commands."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from rtml.errors import RtmlError
from rtml.settings import Settings, get_settings

app = typer.Typer(help="The GraphQL API.", no_args_is_help=True)


@app.callback()
def api() -> None:
    """The GraphQL API (a group even with one command, so that `rtml api schema` names it)."""

# The tenant `rtml up` and `make demo` create.
DEMO_TENANT = "demo"


@app.command()
def schema() -> None:
    """Print the GraphQL schema (SDL)."""
    from api.schema import schema as graphql_schema

    typer.echo(str(graphql_schema))


def query(
    document: Annotated[str, typer.Argument(help="The GraphQL document, e.g. '{ anomalies(first: 5) { edges { node { entity eventTime } } } }'.")],
    tenant: Annotated[str, typer.Option(help="The tenant to ask as (the x-rtml-tenant header).")] = DEMO_TENANT,
    url: Annotated[Optional[str], typer.Option(help="The GraphQL endpoint; default: the app's address from settings.")] = None,
    variables: Annotated[Optional[str], typer.Option(help='Variables as a JSON object, e.g. \'{"first": 10}\'.')] = None,
) -> None:
    """Run a GraphQL query or mutation against a running app and print the JSON result; exits 1
    when the result has errors (their messages go to stderr)."""
    import httpx

    from api.tenancy import TENANT_HEADER

    given = _variables(variables)
    endpoint = url or graphql_url(get_settings())
    try:
        response = httpx.post(endpoint, json={"query": document, "variables": given}, headers={TENANT_HEADER: tenant}, timeout=60.0)
    except httpx.HTTPError as error:
        raise RtmlError(f"no rtml app answers at {endpoint} ({error}); start it with `rtml up`, or give its --url") from None
    try:
        result = response.json()
    except ValueError:
        raise RtmlError(f"{endpoint} answered HTTP {response.status_code} with no GraphQL result: {response.text[:200]!r}") from None
    typer.echo(json.dumps(result, indent=2))
    errors = result.get("errors") if isinstance(result, dict) else None
    if errors:
        for error in errors:
            code = (error.get("extensions") or {}).get("code", "ERROR")
            typer.echo(f"{code}: {error.get('message')}", err=True)
        sys.exit(1)


def graphql_url(settings: Settings) -> str:
    """The GraphQL endpoint of the app these settings serve."""
    serving = settings.serving
    host = "127.0.0.1" if serving.http_host in ("0.0.0.0", "::") else serving.http_host
    return f"http://{host}:{serving.http_port}{serving.route_prefix.rstrip('/')}/graphql"


def _variables(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise typer.BadParameter(f"not JSON: {error}", param_hint="--variables") from None
    if not isinstance(value, dict):
        raise typer.BadParameter('give a JSON object, e.g. \'{"first": 10}\'', param_hint="--variables")
    return value
