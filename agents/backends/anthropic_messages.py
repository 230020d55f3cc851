"""Anthropic Messages (the Claude API reference, "Create a Message",
https://platform.claude.com/docs/en/api/messages/create; errors:
https://platform.claude.com/docs/en/api/errors).

Request: ``POST {agents.llm_base_url}/v1/messages`` (a base url such as
``https://api.anthropic.com``) with the headers ``x-api-key``, ``anthropic-version: 2023-06-01`` and
``content-type: application/json``, and the JSON body ``model``, ``max_tokens``, ``system`` and
``messages`` (one ``user`` message). Answer: a ``message`` object whose ``content`` is a list of
blocks; the text is that of its blocks of type ``text``, in order.
"""

from __future__ import annotations

from pydantic import BaseModel

from agents.backends.llm import LLMError, post_json

API_VERSION = "2023-06-01"


class _Block(BaseModel):
    type: str
    text: str = ""  # only "text" blocks carry it


class _Message(BaseModel):
    content: list[_Block]


class AnthropicMessages:
    """An ``LLM`` over the Anthropic Messages API."""

    provider = "anthropic"

    def __init__(self, base_url: str, model: str, api_key: str, max_tokens: int):
        self.url = base_url.rstrip("/") + "/v1/messages"
        self.model = model
        self._headers = {"x-api-key": api_key, "anthropic-version": API_VERSION, "content-type": "application/json"}
        self._max_tokens = max_tokens

    async def complete(self, system: str, prompt: str, timeout_s: float) -> str:
        body = {
            "model": self.model,
            "max_tokens": self._max_tokens,
            "system": system,
            "messages": [{"role": "user", "content": prompt}],
        }
        answer = await post_json(self.url, self._headers, body, _Message, timeout_s)
        text = "".join(block.text for block in answer.content if block.type == "text")
        if not text:
            raise LLMError(f"{self.url} answered a malformed body (content: no block of type 'text')")
        return text
