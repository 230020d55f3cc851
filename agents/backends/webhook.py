"""A plain webhook as an alert channel: ``POST {url}`` with the JSON body
``{"action": "fired" | "resolved", "alert": <the Alert as JSON>}``; any 2xx answer is success.

The receiver de-duplicates on ``alert.dedup_key`` (one per incident): an incident fires once when it
opens, again each time it is re-explained, and resolves once.
"""

from __future__ import annotations

from typing import Literal

from agents.backends.alerts import post_json
from agents.evidence import Alert


class WebhookNotifier:
    name = "webhook"

    def __init__(self, url: str):
        self.url = url

    async def fire(self, alert: Alert) -> None:
        await self._post("fired", alert)

    async def resolve(self, alert: Alert) -> None:
        await self._post("resolved", alert)

    async def _post(self, action: Literal["fired", "resolved"], alert: Alert) -> None:
        await post_json(self.name, self.url, {"action": action, "alert": alert.model_dump(mode="json")})
