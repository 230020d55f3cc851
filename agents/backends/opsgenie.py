"""Opsgenie as an alert channel, over its Alert API (https://docs.opsgenie.com/docs/alert-api).

- Create: ``POST {url}/v2/alerts`` with ``message`` (required, at most 130 characters), ``alias``
  (at most 512: the key of Opsgenie's de-duplication — a create whose alias matches an open alert
  only bumps that alert's count), ``description`` (at most 15,000), ``priority`` (P1..P5),
  ``tags`` (at most 20, 50 characters each), ``details`` (string pairs), ``entity``, ``source``.
- Close: ``POST {url}/v2/alerts/{alias}/close?identifierType=alias``.
- Both authenticate with ``Authorization: GenieKey <api key>`` and are processed asynchronously:
  a valid request is answered 202 Accepted.

The alias is the incident's dedup key, so re-firing an incident counts on its one open alert; an
open alert keeps the message and priority it was created with (Opsgenie's de-duplication changes
only its count). The API key is read from the secrets provider at each send, so a key added or
rotated later is picked up without a restart.
"""

from __future__ import annotations

from urllib.parse import quote

from agents.backends.alerts import NotifyError, Secrets, post_json
from agents.evidence import Alert

MESSAGE_LIMIT = 130
ALIAS_LIMIT = 512
DESCRIPTION_LIMIT = 15_000
TAG_LIMIT = 50
PRIORITY = {"critical": "P1", "warning": "P3", "info": "P5"}
SOURCE = "rtml"


class OpsgenieNotifier:
    name = "opsgenie"

    def __init__(self, url: str, secrets: Secrets, api_key_secret: str):
        self.url = url.rstrip("/")
        self.secrets = secrets
        self.api_key_secret = api_key_secret

    async def fire(self, alert: Alert) -> None:
        await post_json(self.name, f"{self.url}/v2/alerts", create_body(alert), headers=self._auth())

    async def resolve(self, alert: Alert) -> None:
        alias = quote(alert.dedup_key[:ALIAS_LIMIT], safe="")
        await post_json(
            self.name,
            f"{self.url}/v2/alerts/{alias}/close",
            {"source": SOURCE, "note": f"rtml incident {alert.incident_id} resolved."},
            headers=self._auth(),
            params={"identifierType": "alias"},
        )

    def _auth(self) -> dict[str, str]:
        try:
            key = self.secrets.get(self.api_key_secret)
        except Exception as error:  # noqa: BLE001 - any provider's failure (missing, unreadable, Vault down) means no key
            raise NotifyError(
                f"opsgenie: no API key: the secret {self.api_key_secret!r} could not be read ({error}). "
                f"Store the Opsgenie API integration's key under that name, or name another secret "
                f"with RTML_AGENTS__OPSGENIE_API_KEY_SECRET."
            ) from None
        return {"Authorization": f"GenieKey {key}"}


def create_body(alert: Alert) -> dict:
    """The create-alert request body for ``alert``, cut to the API's limits."""
    message = alert.summary.strip() or f"Anomalies on {alert.entity} (tenant {alert.tenant})"
    return {
        "message": _cut(message, MESSAGE_LIMIT),
        "alias": alert.dedup_key[:ALIAS_LIMIT],
        "description": _cut(alert.description, DESCRIPTION_LIMIT),
        "priority": PRIORITY[alert.severity],
        "tags": [_cut(tag, TAG_LIMIT) for tag in ("rtml", f"tenant:{alert.tenant}", f"severity:{alert.severity}")],
        "details": {
            **alert.labels,
            "tenant": alert.tenant,
            "entity": alert.entity,
            "incident_id": alert.incident_id,
            "dedup_key": alert.dedup_key,
            "started_at": alert.started_at.isoformat(),
        },
        "entity": alert.entity,
        "source": SOURCE,
    }


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
