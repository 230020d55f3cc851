"""The Reasoning agent: both providers against a local server of their documented APIs
(``tests/doubles/llm.py``), the two-step chain, the template reasoner and the fallback to it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import httpx
import pytest

import agents.reasoning as reasoning_module
from agents.backends.llm import open_llm
from agents.evidence import Document, GraphEvidence, Incident, Neighbour, RootCause, SearchEvidence, SearchHit
from agents.reasoning import SECTIONS, TEMPLATE_MARK, Reasoner, load_prompt, parse_sections
from rtml.settings import Settings
from security.secrets import EnvSecrets, MissingSecret
from tests.doubles.llm import LlmDouble

PROVIDERS = ["openai", "anthropic"]
KEY = "sk-test"
T0 = datetime(2024, 6, 1, 1, 42, tzinfo=timezone.utc)
INCIDENT = Incident(
    incident_id="i1", tenant="acme", entity="pump-1", entities=["pump-1", "pump-2"], first_anomaly_at={"pump-1": T0, "pump-2": T0},
    started_at=T0, last_at=T0.replace(minute=50), anomalies=7, peak_score=0.93, first_prediction_id="p1", latest_prediction_id="p7",
)  # fmt: skip
SEARCH = SearchEvidence(hits=[
    SearchHit(document=Document(doc_id="r1", tenant="acme", kind="incident_report", title="pump-1 readings erratic", text="A loose cable at plc-a.", at=T0.replace(month=5)), score=0.8, bm25=3.0),
    SearchHit(document=Document(doc_id="rb", tenant="acme", kind="runbook", title="Runbook: pumps", text="Reseat the PLC cable."), score=0.7, bm25=2.0),
], backend="embedded")  # fmt: skip
GRAPH = GraphEvidence(
    root_causes=[
        RootCause(entity="plc-a", kind="host", hops=1, anomalous=True, first_anomaly_at=T0, explains=2, rank=1),
        RootCause(entity="pump-1", kind="sensor", hops=0, anomalous=True, first_anomaly_at=T0, explains=1, rank=2),
    ],
    blast_radius=[Neighbour(entity="line-1", kind="service", hops=1, direction="downstream")],
    backend="embedded",
)
SEARCH_DOWN = SearchEvidence(partial=True, error="the search node timed out after 2s")
GRAPH_DOWN = GraphEvidence(partial=True, error="ConnectionError: neo4j down")


def settings_for(provider: str, url: str = "", **agents) -> Settings:
    base = Settings()
    return base.model_copy(update={"agents": base.agents.model_copy(update={"llm_provider": provider, "llm_base_url": url, "llm_model": "model-x", **agents})})


def explain(settings: Settings, search: SearchEvidence = SEARCH, graph: GraphEvidence = GRAPH):
    llm = open_llm(settings, EnvSecrets())
    return asyncio.run(Reasoner(settings.agents, llm).explain(INCIDENT, search, graph))


def url_of(double: LlmDouble, provider: str) -> str:
    return double.openai_url if provider == "openai" else double.anthropic_url


def user_prompt(body: dict) -> str:
    return body["messages"][-1]["content"]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("RTML_SECRET_LLM_API_KEY", KEY)


# ------------------------------------------------------------------------------------ the providers


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_provider_gets_the_documented_request_with_its_key(provider, key):
    with LlmDouble(api_key=KEY) as double:
        explain(settings_for(provider, url_of(double, provider), llm_max_tokens=321))
    path, headers, body = double.requests[0]
    if provider == "openai":
        assert path == "/v1/chat/completions" and headers["authorization"] == f"Bearer {KEY}"
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert body["model"] == "model-x" and body["max_tokens"] == 321 and body["temperature"] == 0
    else:
        assert path == "/v1/messages" and headers["x-api-key"] == KEY
        assert headers["anthropic-version"] == "2023-06-01" and headers["content-type"].startswith("application/json")
        assert body["model"] == "model-x" and body["max_tokens"] == 321
        assert [m["role"] for m in body["messages"]] == ["user"] and "on call" in body["system"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_chain_is_two_calls_the_first_answer_inside_the_second_prompt(provider, key):
    with LlmDouble(api_key=KEY) as double:
        reasoning = explain(settings_for(provider, url_of(double, provider)))
    assert len(double.requests) == 2
    facts_prompt, diagnosis_prompt = (user_prompt(body) for _, _, body in double.requests)
    assert "pump-1 readings erratic" in facts_prompt and "candidates:" not in facts_prompt  # the graph evidence is step 2's
    assert "WHAT: double answer 1: what" in diagnosis_prompt and "SIMILAR: double answer 1: similar" in diagnosis_prompt
    assert "1. plc-a (host, 1 hop(s) upstream" in diagnosis_prompt and "Reseat the PLC cable." in diagnosis_prompt
    assert reasoning.sections == {
        "what": "double answer 1: what", "where": "double answer 1: where", "since": "double answer 1: since",
        "similar": "double answer 1: similar", "cause": "double answer 2: cause", "checks": "double answer 2: checks",
    }  # fmt: skip
    assert reasoning.provider == provider and reasoning.model == "model-x" and reasoning.prompt_version == "explain-v1"
    assert not reasoning.fallback and not reasoning.partial and reasoning.error is None
    assert reasoning.summary == (
        "double answer 1: what. Since double answer 1: since. Likely cause: double answer 2: cause. First check: double answer 2: checks."
    )


def test_an_openai_compatible_server_without_a_key_gets_no_authorization_header(monkeypatch):
    monkeypatch.delenv("RTML_SECRET_LLM_API_KEY", raising=False)
    with LlmDouble() as double:
        reasoning = explain(settings_for("openai", double.openai_url))
    assert [headers.get("authorization") for _, headers, _ in double.requests] == [None, None]
    assert reasoning.provider == "openai" and not reasoning.fallback


def test_anthropic_needs_its_key_and_the_error_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("RTML_SECRET_LLM_API_KEY", raising=False)
    with pytest.raises(MissingSecret, match="RTML_SECRET_LLM_API_KEY"):
        open_llm(settings_for("anthropic", "http://127.0.0.1:9"), EnvSecrets())


def test_a_provider_without_a_base_url_or_model_says_what_to_set():
    with pytest.raises(ValueError, match="agents.llm_base_url and agents.llm_model"):
        open_llm(settings_for("openai", ""), EnvSecrets())
    assert open_llm(settings_for("template"), EnvSecrets()) is None


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_double_refuses_what_the_api_refuses(provider):
    with LlmDouble(api_key=KEY) as double:
        url = url_of(double, provider) + ("/chat/completions" if provider == "openai" else "/v1/messages")
        good = {"openai": {"Authorization": f"Bearer {KEY}"}, "anthropic": {"x-api-key": KEY, "anthropic-version": "2023-06-01"}}[provider]
        wrong_key = httpx.post(url, json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, headers={})
        no_model = httpx.post(url, json={"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, headers=good)
    assert wrong_key.status_code == 401 and no_model.status_code == 400
    for answer in (wrong_key, no_model):
        error = answer.json()["error"]
        assert error["type"] and error["message"]
        if provider == "anthropic":
            assert answer.json()["type"] == "error"


# ------------------------------------------------------------------------------------ the fallback


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("failure", ["5xx", "timeout", "malformed", "wrong key"])
def test_a_failing_provider_gives_the_templates_reasoning_marked(provider, failure, key):
    with LlmDouble(api_key="another-key" if failure == "wrong key" else KEY) as double:
        if failure == "5xx":
            double.fail_status = 503
        elif failure == "timeout":
            double.delay_s = 2.0
        elif failure == "malformed":
            double.raw_body = b'{"choices": [{"text": "legacy shape"}]}' if provider == "openai" else b'{"type": "message", "role": "assistant"}'
        reasoning = explain(settings_for(provider, url_of(double, provider), reasoning_timeout_s=0.5))
    template = explain(settings_for("template"))
    assert reasoning.fallback and reasoning.provider == "template" and reasoning.model == f"{provider}:model-x failed"
    assert reasoning.sections == template.sections and reasoning.prompt_version == "explain-v1"
    assert reasoning.summary.startswith(f"{TEMPLATE_MARK} ({provider}:model-x failed)")
    expected = {"5xx": "HTTP 503", "timeout": "timed out", "malformed": "malformed body", "wrong key": "HTTP 401"}[failure]
    assert reasoning.error.startswith(f"{provider}:model-x failed: ") and expected in reasoning.error
    if failure == "malformed":
        assert ("choices.0.message" if provider == "openai" else "content") in reasoning.error


def test_the_timeout_bounds_the_whole_chain_not_each_call(key):
    with LlmDouble(api_key=KEY) as double:
        double.delay_s = 0.35  # each call alone fits in 0.5s, the two together do not
        reasoning = explain(settings_for("openai", double.openai_url, reasoning_timeout_s=0.5))
    assert reasoning.fallback and "whole chain" in reasoning.error


def test_an_answer_without_the_sections_is_completed_by_the_template_and_marked(key):
    with LlmDouble(api_key=KEY) as double:
        double.answer_text = "I cannot tell.\nCAUSE: plc-a lost power."
        reasoning = explain(settings_for("openai", double.openai_url))
    template = explain(settings_for("template"))
    assert reasoning.provider == "openai" and not reasoning.fallback and reasoning.partial
    assert reasoning.sections["cause"] == "plc-a lost power." and reasoning.sections["what"] == template.sections["what"]
    assert "no what, where, since, similar, checks section" in reasoning.error


@pytest.mark.parametrize("provider", PROVIDERS)
def test_partial_evidence_is_stated_as_unavailable_in_the_prompts(provider, key):
    with LlmDouble(api_key=KEY) as double:
        reasoning = explain(settings_for(provider, url_of(double, provider)), search=SEARCH_DOWN, graph=GRAPH_DOWN)
    facts_prompt, diagnosis_prompt = (user_prompt(body) for _, _, body in double.requests)
    assert "unavailable (search failed: the search node timed out after 2s)" in facts_prompt
    assert "unavailable (the dependency graph failed: ConnectionError: neo4j down)" in diagnosis_prompt
    assert reasoning.partial and not reasoning.fallback


# ---------------------------------------------------------------------------- the template reasoner


def test_the_template_reasoner_is_deterministic_says_so_and_uses_the_evidence():
    first, second = explain(settings_for("template")), explain(settings_for("template"))
    assert first == second
    assert first.provider == "template" and not first.fallback and not first.partial and first.error is None
    assert first.summary.startswith(TEMPLATE_MARK) and "not a language model" in first.summary
    assert list(first.sections) == list(SECTIONS) and first.prompt_version == "explain-v1"
    assert first.sections["where"] == "pump-1 (sensor); it depends on plc-a (host, 1 hop(s))"
    assert first.sections["since"].startswith("2024-06-01 01:42:00 UTC (7 anomalies")
    assert first.sections["similar"] == "pump-1 readings erratic (2024-05-01): A loose cable at plc-a."
    assert first.sections["cause"].startswith("plc-a (host, 1 hop(s) upstream of pump-1)")
    assert first.sections["checks"].startswith("check plc-a first; follow the runbook 'Runbook: pumps'") and "line-1" in first.sections["checks"]
    assert "Likely cause: plc-a" in first.summary and "First check: check plc-a first." in first.summary


def test_the_template_reasoner_says_what_evidence_was_unavailable_and_does_not_guess():
    reasoning = explain(settings_for("template"), search=SEARCH_DOWN, graph=GRAPH_DOWN)
    assert reasoning.partial and not reasoning.fallback
    assert reasoning.sections["similar"] == "unknown: search was unavailable (the search node timed out after 2s)"
    assert reasoning.sections["cause"].startswith("unknown: the dependency graph was unavailable (ConnectionError: neo4j down)")
    assert "plc-a" not in " ".join(reasoning.sections.values())
    assert "by hand" in reasoning.sections["checks"]


def test_with_no_dependency_known_the_entity_itself_is_the_suspect():
    reasoning = explain(settings_for("template"), search=SearchEvidence(), graph=GraphEvidence())
    assert reasoning.sections["cause"].startswith("pump-1 itself") and reasoning.sections["similar"] == "no similar past incident found"
    assert not reasoning.partial


# ---------------------------------------------------------------------------------------- prompts


def test_sections_are_parsed_from_headed_answers():
    text = "Here you go.\nWHAT: a\nspike\n**CAUSE**: b\n## CHECKS: c; d\nWHERE:\n"
    assert parse_sections(text) == {"what": "a spike", "cause": "b", "checks": "c; d"}


def test_an_unknown_prompt_version_lists_the_versions_there():
    with pytest.raises(ValueError, match=r"no prompt version 'v9'.*the versions there are: explain-v1"):
        load_prompt("v9")
    with pytest.raises(ValueError, match="no prompt version"):
        Reasoner(settings_for("template", prompt_version="v9").agents, None)


def test_a_prompt_file_with_a_placeholder_no_evidence_fills_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(reasoning_module, "PROMPTS", tmp_path)
    load_prompt.cache_clear()
    try:
        (tmp_path / "bad-v1.yaml").write_text("version: bad-v1\nsystem: s\nsteps:\n  facts: '{tenant} {weather}'\n  diagnosis: '{facts}'\n")
        with pytest.raises(ValueError, match=r"step 'facts' uses \['weather'\]"):
            load_prompt("bad-v1")
        (tmp_path / "short-v1.yaml").write_text("version: short-v1\nsystem: s\nsteps:\n  facts: f\n")
        with pytest.raises(ValueError, match="is not a prompt chain"):
            load_prompt("short-v1")
    finally:
        load_prompt.cache_clear()


def test_the_shipped_prompt_asks_for_every_section():
    prompt = load_prompt("explain-v1")
    asked = prompt.steps.facts + prompt.steps.diagnosis
    assert all(f"\n{name.upper()}:" in asked for name in SECTIONS)
    assert "{facts}" in prompt.steps.diagnosis and prompt.version == "explain-v1"
