"""The Reasoning agent: prompt chaining over the evidence, or the template reasoner.

    reasoning = await Reasoner(settings.agents, open_llm(settings, secrets)).explain(incident, search, graph)

The chain (``agents/prompts/<agents.prompt_version>.yaml``) has two steps: ``facts`` (what, where,
since when, similar past incidents) and ``diagnosis`` (the facts' answer, the graph evidence and the
runbooks in; suspected cause and next checks out). Each answer comes in headed sections
(``WHAT:``, ``CAUSE:``, ...), which fill ``Reasoning.sections``; the summary is built from them.

Without a model (``llm=None``) the **template reasoner** fills the same sections deterministically
from the same evidence, and its summary says it was written by a template. When the model times
out (``agents.reasoning_timeout_s``, the whole chain), answers non-2xx or a malformed body, the
template stands in: ``fallback=True``, ``error`` saying what happened, ``model`` naming what failed.
Evidence that a node marked partial is stated as unavailable, in the prompt and the template alike.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from agents.backends.llm import LLM, LLMError
from agents.evidence import GraphEvidence, Incident, Reasoning, SearchEvidence
from rtml.settings import AgentsSettings

PROMPTS = Path(__file__).parent / "prompts"
SECTIONS = ("what", "where", "since", "similar", "cause", "checks")
TEMPLATE_MARK = "[template reasoner, not a language model]"
_HEADED = re.compile(r"^\s*\**(WHAT|WHERE|SINCE|SIMILAR|CAUSE|CHECKS)\**\s*:\s*", re.MULTILINE)


@dataclass(frozen=True)
class Prompt:
    version: str
    system: str
    facts: str
    diagnosis: str


@lru_cache(maxsize=8)
def load_prompt(version: str) -> Prompt:
    path = PROMPTS / f"{version}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROMPTS.glob("*.yaml")))
        raise ValueError(f"no prompt version {version!r} (agents.prompt_version); the versions are: {known}")
    document = yaml.safe_load(path.read_text())
    return Prompt(document["version"], document["system"], document["steps"]["facts"], document["steps"]["diagnosis"])


def parse_sections(text: str) -> dict[str, str]:
    """The headed sections of a model's answer (``WHAT: ...``), lower-cased names; text outside any
    section is ignored."""
    found: dict[str, str] = {}
    marks = list(_HEADED.finditer(text))
    for mark, following in zip(marks, [*marks[1:], None]):
        body = text[mark.end() : following.start() if following else len(text)].strip()
        found[mark.group(1).lower()] = " ".join(body.split())
    return found


class Reasoner:
    def __init__(self, settings: AgentsSettings, llm: LLM | None):
        self._settings = settings
        self._llm = llm
        self._prompt = load_prompt(settings.prompt_version)

    async def explain(self, incident: Incident, search: SearchEvidence, graph: GraphEvidence) -> Reasoning:
        if self._llm is None:
            return template_reasoning(incident, search, graph, self._prompt.version)
        try:
            return await asyncio.wait_for(self._chain(incident, search, graph), self._settings.reasoning_timeout_s)
        except (LLMError, TimeoutError) as error:
            reason = f"timed out after {self._settings.reasoning_timeout_s:g}s" if isinstance(error, TimeoutError) else str(error)
            fallback = template_reasoning(incident, search, graph, self._prompt.version)
            return fallback.model_copy(update={"fallback": True, "error": f"{self._llm.provider} failed: {reason}", "model": f"{self._llm.provider}:{self._llm.model} failed"})

    async def _chain(self, incident: Incident, search: SearchEvidence, graph: GraphEvidence) -> Reasoning:
        fields = evidence_fields(incident, search, graph)
        timeout = self._settings.reasoning_timeout_s
        facts = await self._llm.complete(self._prompt.system, self._prompt.facts.format_map(fields), timeout)
        diagnosis = await self._llm.complete(self._prompt.system, self._prompt.diagnosis.format_map({**fields, "facts": facts}), timeout)
        sections = {**parse_sections(facts), **parse_sections(diagnosis)}
        template = template_reasoning(incident, search, graph, self._prompt.version).sections
        missing = [name for name in SECTIONS if not sections.get(name)]
        sections = {name: sections.get(name) or template[name] for name in SECTIONS}
        return Reasoning(
            summary=_summary(sections),
            sections=sections,
            provider=self._llm.provider,
            model=self._llm.model,
            prompt_version=self._prompt.version,
            partial=bool(missing) or search.partial or graph.partial,
            error=f"the model's answer lacked {', '.join(missing)} (filled by the template)" if missing else None,
        )


def evidence_fields(incident: Incident, search: SearchEvidence, graph: GraphEvidence) -> dict[str, str]:
    """The evidence as the prompts' placeholders."""
    if search.partial:
        similar = f"unavailable ({search.error})"
    else:
        similar = "; ".join(f"[{hit.document.kind}] {hit.document.title}: {hit.document.text}" for hit in search.hits) or "none found"
    if graph.partial:
        graph_text = f"unavailable ({graph.error})"
    else:
        causes = ", ".join(
            f"{c.rank}. {c.entity} ({c.kind}, {c.hops} hops up, {'anomalous since ' + c.first_anomaly_at.isoformat() if c.anomalous and c.first_anomaly_at else 'not anomalous'}, explains {c.explains})"
            for c in graph.root_causes
        )
        downstream = ", ".join(f"{n.entity} ({n.hops} hops)" for n in graph.blast_radius) or "nothing"
        graph_text = f"candidates: {causes or 'none'}; downstream: {downstream}"
    runbooks = "; ".join(f"{hit.document.title}: {hit.document.text}" for hit in search.hits if hit.document.kind == "runbook") or "none found"
    incident_text = (
        f"{incident.anomalies} anomalies on {', '.join(incident.entities)} from {incident.started_at.isoformat()} to "
        f"{incident.last_at.isoformat()}, peak score {incident.peak_score:.2f}, began on {incident.entity}"
    )
    return {"tenant": incident.tenant, "incident": incident_text, "similar": similar, "graph": graph_text, "runbooks": runbooks}


def template_reasoning(incident: Incident, search: SearchEvidence, graph: GraphEvidence, prompt_version: str) -> Reasoning:
    """The deterministic explanation from the same evidence (the template reasoner)."""
    others = [entity for entity in incident.entities if entity != incident.entity]
    upstream = sorted((c for c in graph.root_causes if c.hops > 0), key=lambda c: c.hops)
    own_kind = next((c.kind for c in graph.root_causes if c.hops == 0), "entity")
    sections = {
        "what": f"{incident.anomalies} anomalous reading(s) on {incident.entity} (peak score {incident.peak_score:.2f})"
        + (f", also on {', '.join(others)}" if others else ""),
        "where": f"{incident.entity} ({own_kind}) of tenant {incident.tenant}"
        + ("".join(f", on {c.entity} ({c.kind})" for c in upstream) if upstream else "")
        + (" (dependency graph unavailable)" if graph.partial else ""),
        "since": f"{incident.started_at:%Y-%m-%d %H:%M:%S} UTC, latest at {incident.last_at:%Y-%m-%d %H:%M:%S} UTC",
        "similar": _similar(search),
        "cause": _cause(incident, graph),
        "checks": _checks(incident, search, graph),
    }
    return Reasoning(
        summary=f"{TEMPLATE_MARK} {_summary(sections)}",
        sections=sections,
        provider="template",
        prompt_version=prompt_version,
        partial=search.partial or graph.partial,
    )


def _similar(search: SearchEvidence) -> str:
    if search.partial:
        return f"search unavailable ({search.error})"
    reports = [hit for hit in search.hits if hit.document.kind in ("incident_report", "enrichment")]
    if not reports:
        return "no similar past incident found"
    best = reports[0].document
    when = f" ({best.at:%Y-%m-%d})" if best.at else ""
    return f"{best.title}{when}: {best.text}"


def _cause(incident: Incident, graph: GraphEvidence) -> str:
    if graph.partial:
        return f"unknown: the dependency graph was unavailable ({graph.error})"
    if not graph.root_causes:
        return f"{incident.entity} itself: the dependency graph knows nothing it depends on"
    top = graph.root_causes[0]
    if top.entity == incident.entity or not top.anomalous:
        return f"{incident.entity} itself: nothing it depends on is anomalous"
    since = f" since {top.first_anomaly_at:%H:%M:%S} UTC" if top.first_anomaly_at else ""
    return f"{top.entity} ({top.kind}, {top.hops} hop(s) upstream), anomalous{since}, upstream of {top.explains} anomalous entit{'y' if top.explains == 1 else 'ies'}"


def _checks(incident: Incident, search: SearchEvidence, graph: GraphEvidence) -> str:
    checks = []
    if graph.root_causes and not graph.partial and graph.root_causes[0].anomalous and graph.root_causes[0].entity != incident.entity:
        checks.append(f"check {graph.root_causes[0].entity} first")
    runbooks = [hit.document for hit in search.hits if hit.document.kind == "runbook"]
    if runbooks:
        checks.append(f"follow '{runbooks[0].title}': {runbooks[0].text}")
    else:
        checks.append(f"check {incident.entity}'s recent changes and raw readings")
    if graph.blast_radius:
        checks.append("watch what depends on it: " + ", ".join(n.entity for n in graph.blast_radius))
    return "; ".join(checks)


def _summary(sections: dict[str, str]) -> str:
    parts = {name: sections[name].rstrip(". ") for name in ("what", "since", "cause", "checks")}
    return f"{parts['what']} since {parts['since']}. Likely cause: {parts['cause']}. First: {parts['checks']}."
