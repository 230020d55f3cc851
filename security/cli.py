"""`rtml certs dev`: a local CA and certificates for the TLS entry, its clients and Ray's own TLS."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()

app = typer.Typer(help="Certificates for TLS at the entry and between Ray's processes.", no_args_is_help=True)


@app.command("dev")
def dev(
    directory: Optional[Path] = typer.Option(None, "--dir", help="Where to write them (default: <home>/certs). A CA already there is kept."),
    host: list[str] = typer.Option([], "--host", help="Another name or address clients use for this machine (repeat the option)."),
) -> None:
    """Mint a local CA, a server certificate (the TLS entry's and every Ray process's) and a client
    certificate (for mutual TLS); print their paths and the settings that use them."""
    from rtml.settings import get_settings
    from security.certs import mint_dev_pki

    settings = get_settings()
    pki = mint_dev_pki(directory or settings.home_dir / "certs", host)
    console.print(f"CA:      {pki.ca_cert}  (key {pki.ca_key})", highlight=False)
    console.print(f"server:  {pki.server_cert}  (key {pki.server_key})", highlight=False)
    console.print(f"client:  {pki.client_cert}  (key {pki.client_key})", highlight=False)
    entry = {
        "RTML_SECURITY__TLS_CERT_FILE": pki.server_cert,
        "RTML_SECURITY__TLS_KEY_FILE": pki.server_key,
        "RTML_SECURITY__TLS_CLIENT_CA_FILE": pki.ca_cert,
        "RTML_SECURITY__TLS_CLIENT_AUTH": "required",
    }
    ray = {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": pki.server_cert, "RAY_TLS_SERVER_KEY": pki.server_key, "RAY_TLS_CA_CERT": pki.ca_cert}
    console.print("\n# the HTTPS entry `rtml up` starts, with mutual TLS (client certificates required):", soft_wrap=True)
    _exports(entry)
    console.print("# Ray's own TLS between its processes: in the environment of `rtml up` (or `ray start`) and of every Ray client:", soft_wrap=True)
    _exports(ray)
    serving = settings.serving
    console.print(
        f"\n# then, after `rtml up`:\ncurl --cacert {shlex.quote(str(pki.ca_cert))} --cert {shlex.quote(str(pki.client_cert))} "
        f"--key {shlex.quote(str(pki.client_key))} https://localhost:{serving.tls_port}{serving.route_prefix.rstrip('/')}/healthz",
        highlight=False,
        soft_wrap=True,
    )


def _exports(variables: dict[str, object]) -> None:
    for name, value in variables.items():
        console.print(f"export {name}={shlex.quote(str(value))}", highlight=False, soft_wrap=True)
