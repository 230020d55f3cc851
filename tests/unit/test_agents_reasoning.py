"""The Reasoning agent: both providers against a local server speaking their documented APIs, the
two-step chain, the template reasoner and the fallback to it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from agents.backends.llm import open_llm
from agents.evidence import Document, GraphEvidence, Incident, Neighbour, RootCause, SearchEvidence, SearchHit
from agents.reasoning import TEMPLATE_MARK, Reasoner, load_prompt, parse_sections
from rtml.settings import Settings
from security.secrets import EnvSecrets, FileSecrets, MissingSecret, open_secrets
from tests.doubles.llm import LlmDouble

T0 = datetime(2024, 6, 1, 1, 42, tzinfo=timezone.utc)
INCIDENT = Incident(
    incident_id="i1", tenant="acme", entity="pump-1", entities=["pump-1", "pump-2"], first_anomaly_at={"pump-1": T0, "pump-2": T0},
    started_at=T0, last_at=T0, anomalies=7, peak_score=0.93, first_prediction_id="p1", latest_prediction_id="p7",
)
SEARCH = SearchEvidence(hits=[
    SearchHit(document=Document(doc_id="r1", tenant="acme", kind="incident_report", title="pump-1 readings erratic", text="A loose cable at plc-a.", at=T0.replace(month=5)), score=0.8, bm25=3.0),
    SearchHit(document=Document(doc_id="rb", tenant="acme", kind="runbook", title="Runbook: pumps", text="Check the cable first."), score=0.7, bm25=2.0),
], backend="embedded")  # fmt: skip
GRAPH = GraphEvidence(
    root_causes=[
        RootCause(entity="plc-a", kind="host", hops=1, anomalous=True, first_anomaly_at=T0, explains=2, rank=1),
        RootCause(entity="pump-1", kind="sensor", hops=0, anomalous=True, first_anomaly_at=T0, explains=1, rank=2),
    ],
    blast_radius=[Neighbour(entity="line-1", kind="service", hops=1, direction="downstream")],
    backend="embedded",
)


def settings_for(provider: str, url: str = "", **agents) -> Settings:
    base = Settings()
    return base.model_copy(update={"agents": base.agents.model_copy(update={"llm_provider": provider, "llm_base_url": url, "llm_model": "model-x", **agents})})


def explain(settings: Settings, secrets=None, search=SEARCH, graph=GRAPH):
    llm = open_llm(settings, secrets or EnvSecrets())
    return asyncio.run(Reasoner(settings.agents, llm).explain(INCIDENT, search, graph))


def test_the_template_reasoner_is_deterministic_says_so_and_uses_the_evidence():
    first, second = explain(settings_for("template")), explain(settings_for("template"))
    assert first == second
    assert first.provider == "template" and first.summary.startswith(TEMPLATE_MARK) and not first.fallback
    assert "plc-a" in first.sections["cause"] and "pump-1 readings erratic" in first.sections["similar"]
    assert first.sections["checks"].startswith("check plc-a first") and "line-1" in first.sections["checks"]
    assert first.prompt_version == "explain-v1"


def test_partial_evidence_is_said_to_be_unavailable_not_guessed():
    reasoning = explain(settings_for("template"), search=SearchEvidence(partial=True, error="the search node timed out after 2s"), graph=GraphEvidence(partial=True, error="down"))
    assert reasoning.partial
    assert "search unavailable" in reasoning.sections["similar"] and "unknown" in reasoning.sections["cause"]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_provider_runs_the_two_step_chain_with_the_documented_request(provider, monkeypatch):
    monkeypatch.setenv("RTML_SECRET_LLM_API_KEY", "sk-test")
    with LlmDouble(api_key="sk-test") as llm:
        url = llm.openai_url if provider == "openai" else llm.anthropic_url
        reasoning = explain(settings_for(provider, url))
    assert [path for path, _, _ in llm.requests] == ["/v1/chat/completions" if provider == "openai" else "/v1/messages"] * 2
    (_, _, facts), (_, headers, diagnosis) = llm.requests
    if provider == "openai":
        assert headers["authorization"] == "Bearer sk-test" and diagnosis["messages"][0]["role"] == "system"
        second_prompt = diagnosis["messages"][1]["content"]
    else:
        assert headers["x-api-key"] == "sk-test" and headers["anthropic-version"] == "2023-06-01" and diagnosis["system"]
        second_prompt = diagnosis["messages"][0]["content"]
    assert "WHAT: the model saw a spike." in second_prompt  # the first answer is in the second prompt
    assert "pump-1 readings erratic" in str(facts)
    assert reasoning.provider == provider and reasoning.model == "model-x" and not reasoning.fallback
    assert reasoning.sections["what"] == "the model saw a spike." and reasoning.sections["cause"] == "the model suspects the upstream host."


@pytest.mark.parametrize("failure", ["5xx", "timeout", "malformed"])
def test_a_failing_provider_falls_back_to_the_template_marked(failure):
    with LlmDouble() as llm:
        if failure == "5xx":
            llm.fail_status = 503
        elif failure == "timeout":
            llm.delay_s = 2.0
        elif failure == "malformed":
            llm.raw_body = b'{"choices": [{"text": "no message"}]}'
        reasoning = explain(settings_for("openai", llm.openai_url, reasoning_timeout_s=0.5))
    assert reasoning.fallback and reasoning.provider == "template" and reasoning.model == "openai:model-x failed"
    assert reasoning.summary.startswith(TEMPLATE_MARK)
    expected = {"5xx": "503", "timeout": "timed out after 0.5s", "malformed": "without the documented fields"}[failure]
    assert expected in reasoning.error


def test_an_answer_without_the_sections_is_filled_by_the_template_and_marked():
    with LlmDouble() as llm:
        llm.answer_text = "I cannot tell."
        reasoning = explain(settings_for("openai", llm.openai_url))
    assert reasoning.provider == "openai" and reasoning.partial and "lacked what" in reasoning.error
    assert "plc-a" in reasoning.sections["cause"]


def test_sections_parse_and_an_unknown_prompt_version_is_named():
    assert parse_sections("intro\nWHAT: a\nspike\n**CAUSE**: b") == {"what": "a spike", "cause": "b"}
    with pytest.raises(ValueError, match="no prompt version 'v9'.*explain-v1"):
        load_prompt("v9")


def test_anthropic_needs_its_key_and_the_error_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("RTML_SECRET_LLM_API_KEY", raising=False)
    with pytest.raises(MissingSecret, match=r"\$RTML_SECRET_LLM_API_KEY"):
        open_llm(settings_for("anthropic", "http://127.0.0.1:1"), EnvSecrets())


def test_secrets_come_from_env_or_files(tmp_path, monkeypatch):
    monkeypatch.setenv("RTML_SECRET_OPSGENIE_API_KEY", "k1")
    assert EnvSecrets().get("opsgenie-api-key") == "k1"
    (tmp_path / "llm-api-key").write_text("k2\n")
    assert FileSecrets(tmp_path).get("llm-api-key") == "k2"
    with pytest.raises(MissingSecret, match=str(tmp_path / "nope")):
        FileSecrets(tmp_path).get("nope")
    base = Settings(home=tmp_path)
    chosen = open_secrets(base.model_copy(update={"security": base.security.model_copy(update={"secrets_provider": "file"})}))
    assert isinstance(chosen, FileSecrets) and chosen.directory == tmp_path.resolve() / "secrets"
