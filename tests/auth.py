"""Credentials for test clients: the headers a caller of a tenant, in a role, sends to the API."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from rtml.settings import Settings
from security.tokens import TokenAuthority


def auth_headers(settings: Settings, tenant: str, role: str = "admin") -> dict[str, str]:
    """The HTTP headers (or ``connection_init`` payload) of a caller of ``tenant`` in ``role``:
    a bearer token signed with ``settings``' keys."""
    return {"authorization": f"Bearer {token(settings, tenant, role)}"}


def token(settings: Settings, tenant: str, role: str = "admin") -> str:
    return _authority(settings.home_dir, settings.model_dump_json()).issue(tenant, role, subject=f"test-{role}")


@cache
def _authority(home: Path, settings_json: str) -> TokenAuthority:
    return TokenAuthority(Settings.model_validate_json(settings_json))
