"""The Reasoning agent's language models, behind one interface: OpenAI-compatible chat completions
(``openai_chat``: the OpenAI API, and the same route served by vLLM, Ollama or llama.cpp) and
Anthropic Messages (``anthropic_messages``). ``agents.llm_provider = "template"`` means no model:
the template reasoner (``agents.reasoning``) writes the explanation.

    llm = open_llm(settings, secrets)                           # None for "template"
    text = await llm.complete(system, prompt, timeout_s=20)     # raises LLMError

The embedded stand-in for a hosted model is the template reasoner; tests run both providers
against ``tests/doubles/llm.py``, a local server of the two documented APIs.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from rtml.settings import Settings
from security.secrets import MissingSecret, SecretsProvider

Answer = TypeVar("Answer", bound=BaseModel)


class LLMError(RuntimeError):
    """The model did not answer usably: a timeout, a non-2xx status or a malformed body (the
    message says which)."""


class LLMTimeout(LLMError):
    """The model did not answer within the time it was given."""


class LLM(Protocol):
    provider: str  # "openai" or "anthropic"
    model: str

    async def complete(self, system: str, prompt: str, timeout_s: float) -> str:
        """The model's answer to ``prompt`` under the ``system`` instructions, within
        ``timeout_s`` seconds; raises ``LLMError``."""
        ...


async def post_json(url: str, headers: dict[str, str], body: dict[str, Any], answer: type[Answer], timeout_s: float) -> Answer:
    """POST ``body`` as JSON and parse the 2xx answer as ``answer``, all within ``timeout_s``
    seconds; every failure is an ``LLMError`` saying what went wrong."""
    try:
        async with asyncio.timeout(timeout_s), httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.post(url, json=body, headers=headers)
    except (TimeoutError, httpx.TimeoutException):
        raise LLMTimeout(f"{url} did not answer within {timeout_s:g}s") from None
    except httpx.HTTPError as error:
        raise LLMError(f"{url} could not be reached ({type(error).__name__}: {error}); check agents.llm_base_url") from None
    if not response.is_success:
        raise LLMError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")
    try:
        return answer.model_validate_json(response.content)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        raise LLMError(f"{url} answered a malformed body ({where}: {first['msg']}): {response.text[:300]}") from None


def open_llm(settings: Settings, secrets: SecretsProvider) -> LLM | None:
    """The model ``settings.agents`` names, or None for the template reasoner. The API key is
    ``secrets.get(agents.llm_api_key_secret)``: Anthropic requires it (``MissingSecret``
    propagates); an OpenAI-compatible server may go without (local servers such as Ollama,
    llama.cpp or vLLM), and then no Authorization header is sent."""
    agents = settings.agents
    if agents.llm_provider == "template":
        return None
    if not agents.llm_base_url or not agents.llm_model:
        raise ValueError(
            f"agents.llm_provider = {agents.llm_provider!r} needs agents.llm_base_url and agents.llm_model "
            "(e.g. RTML_AGENTS__LLM_BASE_URL=https://api.openai.com/v1 RTML_AGENTS__LLM_MODEL=...), or set it to 'template'"
        )
    # Imported here: both modules import this one for LLMError and post_json.
    if agents.llm_provider == "anthropic":
        from agents.backends.anthropic_messages import AnthropicMessages

        key = secrets.get(agents.llm_api_key_secret)
        return AnthropicMessages(agents.llm_base_url, agents.llm_model, key, agents.llm_max_tokens)
    from agents.backends.openai_chat import OpenAIChat

    try:
        key = secrets.get(agents.llm_api_key_secret)
    except MissingSecret:
        key = None
    return OpenAIChat(agents.llm_base_url, agents.llm_model, key, agents.llm_max_tokens)
