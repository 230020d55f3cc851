"""OpenAI-compatible chat completions (the OpenAI API reference, "Create chat completion",
https://platform.openai.com/docs/api-reference/chat/create; vLLM, Ollama and llama.cpp serve the
same route under their ``/v1``).

Request: ``POST {agents.llm_base_url}/chat/completions`` (a base url such as
``https://api.openai.com/v1``) with ``Authorization: Bearer <key>`` (left out when there is no key,
for local servers) and the JSON body ``model``, ``messages`` (a ``system`` and a ``user`` message),
``max_tokens`` and ``temperature: 0``. Answer: a ``chat.completion`` object whose
``choices[0].message.content`` is the text.
"""

from __future__ import annotations

from pydantic import BaseModel

from agents.backends.llm import LLMError, post_json


class _Message(BaseModel):
    content: str | None  # null when the model answered with a tool call or a refusal instead


class _Choice(BaseModel):
    message: _Message


class _Completion(BaseModel):
    choices: list[_Choice]


class OpenAIChat:
    """An ``LLM`` over an OpenAI-compatible chat completions server."""

    provider = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None, max_tokens: int):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._max_tokens = max_tokens

    async def complete(self, system: str, prompt: str, timeout_s: float) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            "max_tokens": self._max_tokens,
            "temperature": 0,
        }
        answer = await post_json(self.url, self._headers, body, _Completion, timeout_s)
        if not answer.choices or not answer.choices[0].message.content:
            raise LLMError(f"{self.url} answered a malformed body (choices.0.message.content: no text)")
        return answer.choices[0].message.content
