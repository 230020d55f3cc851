"""The alert channels: one interface (``Notifier``), the log channel beside it, and the opener.

    notifiers = open_notifiers(settings, secrets)   # the log, plus each channel settings.agents names
    await notifier.fire(alert)                      # raises NotifyError when the channel refused it
    await notifier.resolve(alert)

Every channel de-duplicates on ``alert.dedup_key`` (one per incident): firing the same incident's
alert again updates or counts the one alert the channel holds, it never opens a second. The
production channels live one per module beside this one (``alertmanager``, ``opsgenie``,
``webhook``); the log channel is always on, so an incident is never alerted nowhere.

A notifier must not block its event loop: ``agents.alerting.Alerter`` bounds each channel's call
with a timeout by cancelling it, which only works for a call that awaits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from agents.evidence import Alert
from rtml.errors import RtmlError
from rtml.settings import Settings

log = logging.getLogger(__name__)

# A transient failure (connection refused or reset, 429, 5xx) is tried again this many times in
# all; the Alerter's timeout bounds the whole, retries included.
ATTEMPTS = 3


class NotifyError(RtmlError):
    """A channel did not take an alert; the message names the channel, what it answered and what to do."""


class Notifier(Protocol):
    name: str

    async def fire(self, alert: Alert) -> None:
        """Open the alert, or update the one open under its dedup key; raises NotifyError on failure."""

    async def resolve(self, alert: Alert) -> None:
        """Close the alert open under its dedup key; raises NotifyError on failure."""


class Secrets(Protocol):
    """What the channels need of ``security.secrets``' providers: a secret's value by name, raising
    (``MissingSecret``) when there is none."""

    def get(self, name: str) -> str: ...


class LogNotifier:
    """Logs each alert (``agents.backends.alerts``'s logger): firing at WARNING, resolved at INFO."""

    name = "log"

    async def fire(self, alert: Alert) -> None:
        log.warning(
            "alert fired [%s] %s (tenant %s, entity %s): %s",
            alert.severity, alert.dedup_key, alert.tenant, alert.entity, alert.summary,
        )  # fmt: skip

    async def resolve(self, alert: Alert) -> None:
        log.info("alert resolved %s (tenant %s, entity %s)", alert.dedup_key, alert.tenant, alert.entity)


def open_notifiers(settings: Settings, secrets: Secrets) -> list[Notifier]:
    """The log channel, then each channel whose URL ``settings.agents`` sets: Alertmanager,
    Opsgenie (its API key read from ``secrets`` when it sends), webhook."""
    from agents.backends.alertmanager import AlertmanagerNotifier
    from agents.backends.opsgenie import OpsgenieNotifier
    from agents.backends.webhook import WebhookNotifier

    agents = settings.agents
    notifiers: list[Notifier] = [LogNotifier()]
    if agents.alertmanager_url:
        notifiers.append(AlertmanagerNotifier(agents.alertmanager_url))
    if agents.opsgenie_url:
        notifiers.append(OpsgenieNotifier(agents.opsgenie_url, secrets, agents.opsgenie_api_key_secret))
    if agents.webhook_url:
        notifiers.append(WebhookNotifier(agents.webhook_url))
    return notifiers


async def post_json(
    channel: str, url: str, body: Any, *, headers: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None
) -> httpx.Response:
    """POST ``body`` as JSON to ``url``, trying a transient failure again (``ATTEMPTS`` in all);
    returns a 2xx response, else raises NotifyError naming ``channel``, the URL and the answer."""
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(ATTEMPTS),
                wait=wait_exponential(multiplier=0.2, max=2.0),
                retry=retry_if_exception(_transient),
                reraise=True,
            ):
                with attempt:
                    response = await client.post(url, json=body, headers=dict(headers or {}), params=params)
                    if response.status_code == 429 or response.status_code >= 500:
                        response.raise_for_status()
    except httpx.HTTPStatusError as error:
        raise _refused(channel, url, error.response) from None
    except httpx.HTTPError as error:
        raise NotifyError(
            f"{channel} at {url} could not be reached ({type(error).__name__}: {error}); "
            f"check that it runs and that the URL in settings.agents is right."
        ) from None
    if not response.is_success:
        raise _refused(channel, url, response)
    return response


def _transient(error: BaseException) -> bool:
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code == 429 or error.response.status_code >= 500
    return isinstance(error, httpx.TransportError)


def _refused(channel: str, url: str, response: httpx.Response) -> NotifyError:
    return NotifyError(f"{channel} at {url} answered {response.status_code}: {response.text[:500]}")
