"""The Reasoning agent: a two-step prompt chain over the evidence, or the template reasoner.

    reasoning = await Reasoner(settings.agents, open_llm(settings, secrets)).explain(incident, search, graph)

The chain (``agents/prompts/<agents.prompt_version>.yaml``) has two steps: ``facts`` (what broke,
where, since when, similar past incidents) and ``diagnosis`` (the facts' answer, the graph evidence
and the runbooks in; the suspected cause and the next checks out). The model answers in headed
sections (``WHAT: ...``, ``CAUSE: ...``) that fill ``Reasoning.sections``; the summary, the
paragraph the person on call reads first, is built from them.

Without a model (``llm=None``) the **template reasoner** fills the same sections deterministically
from the same evidence, and its summary says it was written by a template, not a language model.
When the model times out (``agents.reasoning_timeout_s`` bounds the whole chain), answers non-2xx or
a malformed body, the template stands in: ``fallback=True``, ``error`` saying what happened,
``provider="template"`` and ``model`` naming what failed (``"openai:gpt-x failed"``); it counts as a
failure of the reasoning node (``rtml_agent_node_failures_total``, reason timeout or error). Evidence that
a node marked partial is stated as unavailable, in the prompts and in the template alike.
"""

from __future__ import annotations

import asyncio
import re
import string
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from agents.backends.llm import LLM, LLMError, LLMTimeout
from agents.evidence import Document, GraphEvidence, Incident, Reasoning, SearchEvidence
from observability import metrics
from rtml.settings import AgentsSettings

PROMPTS = Path(__file__).parent / "prompts"
SECTIONS = ("what", "where", "since", "similar", "cause", "checks")
TEMPLATE_MARK = "[written by the template reasoner, not a language model]"
EVIDENCE_FIELDS = frozenset({"tenant", "entity", "incident", "similar", "graph", "runbooks"})
_HEADED = re.compile(r"^[\s#*]*(" + "|".join(name.upper() for name in SECTIONS) + r")[\s*]*:[\s*]*", re.MULTILINE)


class Steps(BaseModel):
    facts: str  # placeholders: EVIDENCE_FIELDS
    diagnosis: str  # placeholders: EVIDENCE_FIELDS and {facts}, the first step's answer


class Prompt(BaseModel):
    version: str
    system: str
    steps: Steps


def prompt_versions() -> list[str]:
    return sorted(path.stem for path in PROMPTS.glob("*.yaml"))


@lru_cache(maxsize=8)
def load_prompt(version: str) -> Prompt:
    """The prompt chain of ``agents/prompts/<version>.yaml``; a ``ValueError`` names an unknown
    version (and the versions there), a malformed file, or a placeholder no evidence fills."""
    path = PROMPTS / f"{version}.yaml"
    if not path.is_file():
        raise ValueError(f"no prompt version {version!r} (agents.prompt_version) in {PROMPTS}; the versions there are: {', '.join(prompt_versions())}")
    try:
        prompt = Prompt.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as error:
        raise ValueError(f"{path} is not a prompt chain (version, system, steps.facts, steps.diagnosis): {error}") from None
    if prompt.version != version:
        raise ValueError(f"{path} says version {prompt.version!r}; a prompt file's version must be its file name, {version!r}")
    for step, allowed in (("facts", EVIDENCE_FIELDS), ("diagnosis", EVIDENCE_FIELDS | {"facts"})):
        used = {field for _, field, _, _ in string.Formatter().parse(getattr(prompt.steps, step)) if field is not None}
        if unknown := used - allowed:
            raise ValueError(f"{path}: step {step!r} uses {sorted(unknown)}, which no evidence fills; the placeholders are {sorted(allowed)}")
    return prompt


def parse_sections(text: str) -> dict[str, str]:
    """The headed sections of a model's answer (``WHAT: ...``, also ``**WHAT**:`` or ``## WHAT:``),
    by lower-cased name, each body on one line; text outside any section is left out."""
    found: dict[str, str] = {}
    marks = list(_HEADED.finditer(text))
    for mark, following in zip(marks, [*marks[1:], None]):
        body = " ".join(text[mark.end() : following.start() if following else len(text)].split())
        if body:
            found[mark.group(1).lower()] = body
    return found


class Reasoner:
    """Explains incidents with ``llm`` through the prompt chain ``settings.prompt_version``, or
    with the template reasoner when ``llm`` is None or fails."""

    def __init__(self, settings: AgentsSettings, llm: LLM | None):
        self._timeout_s = settings.reasoning_timeout_s
        self._llm = llm
        self._prompt = load_prompt(settings.prompt_version)

    async def explain(self, incident: Incident, search: SearchEvidence, graph: GraphEvidence) -> Reasoning:
        if self._llm is None:
            return template_reasoning(incident, search, graph, self._prompt.version)
        try:
            return await self._chain(self._llm, incident, search, graph)
        except LLMError as error:
            failed = f"{self._llm.provider}:{self._llm.model} failed"
            timed_out = isinstance(error, LLMTimeout)
            metrics.AGENT_FAILURES.labels(node="reasoning", reason="timeout" if timed_out else "error").inc()
            if timed_out:
                reason = f"timed out (agents.reasoning_timeout_s = {self._timeout_s:g}s for the whole chain): {error}"
            else:
                reason = str(error)
            return template_reasoning(incident, search, graph, self._prompt.version, failed=failed).model_copy(
                update={"fallback": True, "error": f"{failed}: {reason}", "model": failed}
            )

    async def _chain(self, llm: LLM, incident: Incident, search: SearchEvidence, graph: GraphEvidence) -> Reasoning:
        fields = evidence_fields(incident, search, graph)
        steps, system = self._prompt.steps, self._prompt.system
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        facts = await llm.complete(system, steps.facts.format_map(fields), self._timeout_s)
        diagnosis = await llm.complete(system, steps.diagnosis.format_map({**fields, "facts": facts.strip()}), _left(deadline, self._timeout_s))
        answered = {**parse_sections(facts), **parse_sections(diagnosis)}
        template = template_reasoning(incident, search, graph, self._prompt.version).sections
        missing = [name for name in SECTIONS if name not in answered]
        sections = {name: answered.get(name) or template[name] for name in SECTIONS}
        return Reasoning(
            summary=summary_of(sections),
            sections=sections,
            provider=llm.provider,
            model=llm.model,
            prompt_version=self._prompt.version,
            partial=bool(missing) or search.partial or graph.partial,
            error=f"{llm.provider}:{llm.model}'s answer had no {', '.join(missing)} section (the template's stand in)" if missing else None,
        )


def _left(deadline: float, budget_s: float) -> float:
    """Seconds left of the chain's budget; an ``LLMTimeout`` once it is spent."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise LLMTimeout(f"the first step took the whole {budget_s:g}s")
    return left


def evidence_fields(incident: Incident, search: SearchEvidence, graph: GraphEvidence) -> dict[str, str]:
    """The evidence as the prompts' placeholders (``EVIDENCE_FIELDS``); what a node could not get
    reads "unavailable (why)", so that the model is told, not left to guess."""
    if search.partial:
        similar = runbooks = f"unavailable (search failed: {search.error}); do not guess them"
    else:
        similar = "; ".join(_document(hit.document) for hit in search.hits) or "none found"
        runbooks = "; ".join(_document(hit.document) for hit in search.hits if hit.document.kind == "runbook") or "none found"
    if graph.partial:
        graph_text = f"unavailable (the dependency graph failed: {graph.error}); do not guess it"
    else:
        causes = "; ".join(
            f"{c.rank}. {c.entity} ({c.kind}, {c.hops} hop(s) upstream, "
            + (f"anomalous since {c.first_anomaly_at:%Y-%m-%d %H:%M:%S} UTC" if c.anomalous and c.first_anomaly_at else "anomalous" if c.anomalous else "not anomalous")
            + f", upstream of {c.explains} anomalous entities)"
            for c in graph.root_causes
        )
        downstream = ", ".join(f"{n.entity} ({n.kind}, {n.hops} hop(s))" for n in graph.blast_radius) or "nothing known"
        graph_text = f"candidates: {causes or 'none known'}. Downstream: {downstream}"
    incident_text = (
        f"{incident.anomalies} anomalies (peak score {incident.peak_score:.2f}) on {', '.join(incident.entities)}, "
        f"beginning on {incident.entity} at {incident.started_at:%Y-%m-%d %H:%M:%S} UTC, the latest at {incident.last_at:%Y-%m-%d %H:%M:%S} UTC"
    )
    return {"tenant": incident.tenant, "entity": incident.entity, "incident": incident_text, "similar": similar, "graph": graph_text, "runbooks": runbooks}


def _document(document: Document) -> str:
    when = f" ({document.at:%Y-%m-%d})" if document.at else ""
    return f"[{document.kind}] {document.title}{when}: {document.text}"


def template_reasoning(incident: Incident, search: SearchEvidence, graph: GraphEvidence, prompt_version: str, failed: str = "") -> Reasoning:
    """The deterministic explanation of the same evidence (the template reasoner); ``failed``
    names the model it stands in for, if any, in the summary."""
    sections = {
        "what": _what(incident),
        "where": _where(incident, graph),
        "since": f"{incident.started_at:%Y-%m-%d %H:%M:%S} UTC ({incident.anomalies} anomalies, the latest at {incident.last_at:%Y-%m-%d %H:%M:%S} UTC)",
        "similar": _similar(search),
        "cause": _cause(incident, graph),
        "checks": _checks(incident, search, graph),
    }
    mark = f"{TEMPLATE_MARK} ({failed})" if failed else TEMPLATE_MARK
    return Reasoning(
        summary=f"{mark} {summary_of(sections)}",
        sections=sections,
        provider="template",
        prompt_version=prompt_version,
        partial=search.partial or graph.partial,
    )


def _what(incident: Incident) -> str:
    others = [entity for entity in incident.entities if entity != incident.entity]
    also = f", and on {', '.join(others)}" if others else ""
    return f"{incident.entity} of tenant {incident.tenant} reads anomalous: {incident.anomalies} anomalies, peak score {incident.peak_score:.2f}{also}"


def _where(incident: Incident, graph: GraphEvidence) -> str:
    if graph.partial:
        return f"{incident.entity}; what it depends on is unknown (the dependency graph was unavailable: {graph.error})"
    kind = next((c.kind for c in graph.root_causes if c.entity == incident.entity), "")
    upstream = sorted((c for c in graph.root_causes if c.hops > 0), key=lambda c: (c.hops, c.entity))
    depends = "; it depends on " + ", ".join(f"{c.entity} ({c.kind}, {c.hops} hop(s))" for c in upstream) if upstream else ""
    return f"{incident.entity}" + (f" ({kind})" if kind else "") + depends


def _similar(search: SearchEvidence) -> str:
    if search.partial:
        return f"unknown: search was unavailable ({search.error})"
    reports = [hit.document for hit in search.hits if hit.document.kind in ("incident_report", "enrichment")]
    if not reports:
        return "no similar past incident found"
    best = reports[0]
    when = f" ({best.at:%Y-%m-%d})" if best.at else ""
    return f"{best.title}{when}: {best.text}"


def _cause(incident: Incident, graph: GraphEvidence) -> str:
    if graph.partial:
        return f"unknown: the dependency graph was unavailable ({graph.error}), so only {incident.entity} itself is known to be anomalous"
    top = graph.root_causes[0] if graph.root_causes else None
    if top is None or top.entity == incident.entity or not top.anomalous:
        return f"{incident.entity} itself: nothing it is known to depend on is anomalous"
    since = f" since {top.first_anomaly_at:%Y-%m-%d %H:%M:%S} UTC" if top.first_anomaly_at else ""
    return f"{top.entity} ({top.kind}, {top.hops} hop(s) upstream of {incident.entity}), anomalous{since} and upstream of {top.explains} anomalous entities"


def _checks(incident: Incident, search: SearchEvidence, graph: GraphEvidence) -> str:
    checks = []
    top = graph.root_causes[0] if graph.root_causes and not graph.partial else None
    if top is not None and top.anomalous and top.entity != incident.entity:
        checks.append(f"check {top.entity} first")
    runbooks = [hit.document for hit in search.hits if hit.document.kind == "runbook"]
    if runbooks:
        checks.append(f"follow the runbook '{runbooks[0].title}': {runbooks[0].text}")
    checks.append(f"check {incident.entity}'s recent changes and raw readings")
    if graph.partial:
        checks.append(f"find what {incident.entity} depends on by hand (the dependency graph was unavailable)")
    elif graph.blast_radius:
        checks.append("watch what depends on it: " + ", ".join(n.entity for n in graph.blast_radius))
    return "; ".join(checks)


def summary_of(sections: dict[str, str]) -> str:
    """One paragraph for the person on call: what broke, since when, the likely cause, the first check."""
    what, since, cause = (sections[name].rstrip(" .") for name in ("what", "since", "cause"))
    first = re.split(r";|\s2[.)]\s", sections["checks"])[0]
    first = re.sub(r"^\s*1[.)]\s*", "", first).rstrip(" .")
    return f"{what}. Since {since}. Likely cause: {cause}. First check: {first}."
