"""`rtml api schema` (``app``: the ``api`` command group), `rtml query` (``query``), `rtml token
issue` (``token_app``) and `rtml erase` (``erase``: it reaches every store, ``api.erasure``). Heavy
imports stay inside the commands."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from rtml.errors import RtmlError
from rtml.settings import Settings, get_settings

app = typer.Typer(help="The GraphQL API.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (JWT) signed with this deployment's keys.", no_args_is_help=True)


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


@token_app.command("issue")
def issue_token(
    tenant: Annotated[str, typer.Option(help="The tenant the token acts for.")],
    role: Annotated[str, typer.Option(help="reader, writer (ingest, predict, feedback) or admin (promote, weights, rollouts, erasure, audit).")] = "reader",
    ttl: Annotated[Optional[float], typer.Option(help="Seconds the token lives; default security.jwt_default_ttl_s.")] = None,
    subject: Annotated[Optional[str], typer.Option(help="Who the token names (the audit trail's actor); default: your login.")] = None,
) -> None:
    """Print a signed API token for local use (send it as `Authorization: Bearer <token>`); the
    issue is recorded in the audit trail."""
    typer.echo(issue(get_settings(), tenant, role, subject or _login(), ttl))


def issue(settings: Settings, tenant: str, role: str, subject: str, ttl_s: float | None = None) -> str:
    """A token from this deployment's keys, recorded in the ``audit`` table (never the token itself)."""
    import jwt

    from lakehouse import Lakehouse
    from security.tokens import Role, TokenAuthority

    try:
        token = TokenAuthority(settings).issue(tenant, Role(role), subject, ttl_s)
    except ValueError as error:
        raise RtmlError(f"cannot issue the token: {error}") from None
    claims = jwt.decode(token, options={"verify_signature": False})
    Lakehouse.open(settings).audit(
        subject,
        "token.issue",
        "tokens",
        row_count=1,
        details={"tenant": tenant, "role": role, "token_id": claims["jti"], "expires_at": claims["exp"], "from": "rtml token issue"},
    )
    return token


def _login() -> str:
    import getpass
    import os

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid:{os.getuid()}"


def erase(
    subject: Annotated[str, typer.Option("--subject", help="The data subject's id, as producers send it (its token is found too).")],
    actor: Annotated[
        Optional[str], typer.Option(help="Who asks for the erasure (recorded in the audit table); default: your login.")
    ] = None,
    tenant: Annotated[
        Optional[str],
        typer.Option(
            help="Erase only this tenant's data about the subject (another tenant's subject of that id keeps its data); "
            "default: every tenant."
        ),
    ] = None,
) -> None:
    """Right to erasure: remove a data subject from every store (lakehouse tables and snapshots,
    replicas, search index, graph, token vault); exits 1 when a store could not be reached."""
    import asyncio

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from api.erasure import INCIDENTS, LAKEHOUSE, erase_everywhere

    console = Console()
    report = asyncio.run(erase_everywhere(subject, actor or _login(), tenant))
    scope = "every tenant" if report.tenant is None else f"tenant {report.tenant}"
    console.print(f"erased subject {report.subject_digest} in {scope}", soft_wrap=True)  # the digest whole, to copy
    stores = Table()
    for column in ("store", "removed", "outcome"):
        stores.add_column(column, justify="right" if column == "removed" else "left")
    for store in report.stores:
        stores.add_row(store.store, str(store.removed), Text(store.error, style="red") if store.error else "erased")  # not markup: errors quote [brackets]
    console.print(stores)
    primary = report.store(LAKEHOUSE)
    if primary is not None and primary.details:
        tables = Table(title="lakehouse")
        for column in ("table", "rows removed", "snapshots expired", "files deleted", "blobs deleted"):
            tables.add_column(column, justify="left" if column == "table" else "right")
        for name, erased in primary.details["tables"].items():
            tables.add_row(name, *(str(erased[counted]) for counted in ("rows_removed", "snapshots_expired", "files_deleted", "blobs_deleted")))
        console.print(tables)
    if report.store(INCIDENTS) is None:
        console.print("A running app's open incidents are in its memory: the requestErasure mutation forgets them too.")
    if not report.complete:
        failed = ", ".join(store.store for store in report.failed)
        console.print(f"[bold red]the erasure is incomplete:[/] {failed} (above); rerun `rtml erase` once they answer (it is idempotent)")
        sys.exit(1)
    console.print(
        "The erasure is recorded in the audit table, and its tombstones keep later appends (replays) from "
        "bringing the subject's rows back."
    )


def query(
    document: Annotated[str, typer.Argument(help="The GraphQL document, e.g. '{ anomalies(first: 5) { edges { node { entity eventTime } } } }'.")],
    token: Annotated[Optional[str], typer.Option(envvar="RTML_TOKEN", help="The bearer token to send; default: one issued now for --tenant/--role.")] = None,
    tenant: Annotated[str, typer.Option(help="Without --token: the tenant to ask as.")] = DEMO_TENANT,
    role: Annotated[str, typer.Option(help="Without --token: the role to ask in.")] = "reader",
    url: Annotated[Optional[str], typer.Option(help="The GraphQL endpoint; default: the app's address from settings.")] = None,
    variables: Annotated[Optional[str], typer.Option(help='Variables as a JSON object, e.g. \'{"first": 10}\'.')] = None,
) -> None:
    """Run a GraphQL query or mutation against a running app and print the JSON result; exits 1
    when the result has errors (their messages go to stderr)."""
    import httpx

    given = _variables(variables)
    settings = get_settings()
    endpoint = url or graphql_url(settings)
    bearer = token or issue(settings, tenant, role, _login(), ttl_s=300)
    try:
        response = httpx.post(endpoint, json={"query": document, "variables": given}, headers={"authorization": f"Bearer {bearer}"}, timeout=60.0)
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
