"""The Graph agent: where an incident may have begun (root causes) and what it reaches (blast radius).

    agent = GraphAgent(open_graph(settings), settings.agents)
    evidence = agent.explain(incident, anomalous)        # GraphEvidence

and the two ways a tenant's dependency graph gets in: ``load_graph_file`` (a JSON or CSV file)
and ``graph_from_attributes`` (the events' own ``kind`` / ``depends_on`` / ``host`` / ``site``
attributes); ``agents.workers.load_graph`` merges either into the backend.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from agents.backends.graphstore import GraphBackend
from agents.evidence import Dependency, GraphEntity, GraphEvidence, Incident, Neighbour, RootCause
from rtml.schemas import EntityId, TenantId
from rtml.settings import AgentsSettings

KINDS = frozenset(get_args(GraphEntity.model_fields["kind"].annotation))
CSV_COLUMNS = ("tenant", "entity", "kind", "depends_on")


class GraphAgent:
    """Explains an incident from the tenant's dependency graph, within ``settings.graph_hops``.

    Root-cause candidates are the incident's entity (0 hops) and every entity upstream of it (what
    it depends on, transitively) within the hops. They are ranked, 1 = likeliest:

    1. anomalous ones before those that are not;
    2. then by how many anomalous entities are downstream of it within the hops, itself included
       (``RootCause.explains``), more first;
    3. then by first anomaly, earlier first;
    4. then farther upstream first (the deeper dependency is the likelier origin);
    5. then by name, so that the order is always the same.

    The blast radius is every entity downstream of the incident's entity within the hops, nearest
    first. A backend error propagates (the graph node turns it into partial evidence).
    """

    def __init__(self, backend: GraphBackend, settings: AgentsSettings):
        self._backend = backend
        self._hops = settings.graph_hops

    def explain(self, incident: Incident, anomalous: Mapping[str, datetime]) -> GraphEvidence:
        """The root causes and blast radius of ``incident``. ``anomalous`` maps each entity of the
        tenant that is anomalous now to the event time of its first anomaly; the incident's own
        entities count as anomalous too (from ``incident.first_anomaly_at``, the incident's entity
        from ``incident.started_at`` when it has no entry), the earlier time winning."""
        tenant, entity = incident.tenant, incident.entity
        first = _first_anomalies(incident, anomalous)
        found = self._backend.neighbours(tenant, entity, self._hops)
        own_kind = self._backend.kinds(tenant, [entity]).get(entity, "other")
        candidates = [Neighbour(entity=entity, kind=own_kind, hops=0, direction="upstream")]
        candidates += [n for n in found if n.direction == "upstream" and n.entity != entity]
        explains = self._backend.downstream_counts(tenant, [c.entity for c in candidates], sorted(first), self._hops)

        def order(c: Neighbour) -> tuple:
            at = first.get(c.entity)
            return (at is None, -explains.get(c.entity, 0), at or datetime.max.replace(tzinfo=UTC), -c.hops, c.entity)

        ranked = sorted(candidates, key=order)
        root_causes = [
            RootCause(
                entity=c.entity,
                kind=c.kind,
                hops=c.hops,
                anomalous=c.entity in first,
                first_anomaly_at=first.get(c.entity),
                explains=explains.get(c.entity, 0),
                rank=rank,
            )
            for rank, c in enumerate(ranked, start=1)
        ]
        blast_radius = [n for n in found if n.direction == "downstream"]
        return GraphEvidence(root_causes=root_causes, blast_radius=blast_radius, backend=self._backend.name)


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # naive times are UTC, as events' are


def _first_anomalies(incident: Incident, anomalous: Mapping[str, datetime]) -> dict[str, datetime]:
    first = {entity: _utc(at) for entity, at in anomalous.items()}
    own = dict(incident.first_anomaly_at)
    own.setdefault(incident.entity, incident.started_at)
    for entity, at in own.items():
        first[entity] = min(first.get(entity, _utc(at)), _utc(at))
    return first


# ------------------------------------------------------------------------------------------ graph files


class GraphFileError(ValueError):
    """A graph file that cannot be loaded; the message lists every problem found in it."""


class _EntityRow(GraphEntity):
    model_config = ConfigDict(extra="forbid")
    tenant: TenantId
    entity: EntityId


class _DependencyRow(Dependency):
    model_config = ConfigDict(extra="forbid")
    tenant: TenantId
    entity: EntityId
    depends_on: EntityId


@dataclass
class _Collected:
    """What the rows of one file gave, as they are read: kinds by entity (None: not given), edges, errors."""

    tenant: str | None
    kinds: dict[tuple[str, str], tuple[str | None, str]] = field(default_factory=dict)  # -> (kind, where)
    edges: dict[tuple[str, str, str], Dependency] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def validated(self, model: type[BaseModel], values: dict[str, Any], where: str) -> Any:
        values = {key: value for key, value in values.items() if value not in (None, "")}
        if self.tenant and "tenant" not in values:
            values["tenant"] = self.tenant
        try:
            return model.model_validate(values)
        except ValidationError as error:
            for problem in error.errors():
                name = ".".join(str(part) for part in problem["loc"]) or "row"
                hint = " (give it in the file, or give the tenant that rows without one belong to)" if name == "tenant" and problem["type"] == "missing" else ""
                self.errors.append(f"{where}, field {name!r}: {problem['msg']}{hint}")
            return None

    def entity(self, values: dict[str, Any], where: str) -> None:
        row = self.validated(_EntityRow, values, where)
        if row is None:
            return
        kind = row.kind if "kind" in row.model_fields_set else None
        key = (row.tenant, row.entity)
        known, known_where = self.kinds.get(key, (None, where))
        if kind and known and kind != known:
            self.errors.append(f"{where}: entity {row.entity!r} of tenant {row.tenant!r} is given kind {kind!r} here and {known!r} at {known_where}")
        elif kind or key not in self.kinds:
            self.kinds[key] = (kind, where)

    def dependency(self, values: dict[str, Any], where: str) -> None:
        row = self.validated(_DependencyRow, values, where)
        if row is not None:
            self.edges[(row.tenant, row.entity, row.depends_on)] = Dependency(tenant=row.tenant, entity=row.entity, depends_on=row.depends_on)

    def result(self, path: Path) -> tuple[list[GraphEntity], list[Dependency]]:
        errors = list(dict.fromkeys(self.errors))  # a row that is an edge and a node can fail twice alike
        if errors:
            listed = "\n  ".join(errors)
            raise GraphFileError(f"graph file {path} has {len(errors)} error(s), so nothing was loaded from it; fix them and load it again:\n  {listed}")
        entities = [GraphEntity(tenant=tenant, entity=entity, kind=kind or "other") for (tenant, entity), (kind, _) in self.kinds.items()]
        return entities, list(self.edges.values())


def load_graph_file(path: Path, tenant: str | None = None) -> tuple[list[GraphEntity], list[Dependency]]:
    """The entities and dependencies in a graph file, by its suffix:

    - ``.json``: ``{"nodes": [{"tenant", "entity", "kind"}], "edges": [{"tenant", "entity", "depends_on"}]}``;
    - ``.csv``: header ``tenant,entity,kind,depends_on`` (``tenant`` may be left out when ``tenant``
      is given), one row per node or per edge: a row with ``depends_on`` is the edge ``entity`` ->
      ``depends_on``, a row without is a node only; ``kind`` is the kind of ``entity``.

    ``tenant`` fills in rows that name none. A node given without a kind is "other" unless another
    row gives its kind; an entity that only edges name is not among the entities (loading creates
    it as "other" when new, and keeps its kind otherwise). Repeated rows are merged. Rows are
    validated with the kernel's field types; a file with any error raises ``GraphFileError``
    naming the file and, for each error, the row (CSV: line; JSON: ``nodes[i]`` / ``edges[i]``) and
    field, and gives nothing.
    """
    path = Path(path)
    collected = _Collected(tenant)
    suffix = path.suffix.lower()
    if suffix == ".json":
        _read_json(path, collected)
    elif suffix == ".csv":
        _read_csv(path, collected)
    else:
        raise GraphFileError(f"graph file {path}: unknown format {path.suffix!r}; give a .json file ({{nodes, edges}}) or a .csv file ({','.join(CSV_COLUMNS)})")
    return collected.result(path)


def _read_json(path: Path, collected: _Collected) -> None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        collected.errors.append(f"line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})")
        return
    if not isinstance(document, dict):
        collected.errors.append('the file must hold one JSON object {"nodes": [...], "edges": [...]}')
        return
    unknown = sorted(set(document) - {"nodes", "edges"})
    if unknown:
        collected.errors.append(f"unknown top-level keys {unknown}; the object holds only 'nodes' and 'edges'")
    for section, add in (("nodes", collected.entity), ("edges", collected.dependency)):
        rows = document.get(section, [])
        if not isinstance(rows, list):
            collected.errors.append(f"{section!r} must be a list of objects, got {type(rows).__name__}")
            continue
        for index, row in enumerate(rows):
            where = f"{section}[{index}]"
            if isinstance(row, dict):
                add(row, where)
            else:
                collected.errors.append(f"{where}: must be an object, got {type(row).__name__}")


def _read_csv(path: Path, collected: _Collected) -> None:
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        header = [name.strip() for name in reader.fieldnames or []]
        unknown = [name for name in header if name not in CSV_COLUMNS]
        if "entity" not in header or unknown:
            collected.errors.append(f"line 1: the header must name the columns {','.join(CSV_COLUMNS)} (tenant optional), got {','.join(header) or 'nothing'}")
            return
        reader.fieldnames = header
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row:
                collected.errors.append(f"{where}: more cells than the header has columns")
                continue
            cells = {name: (value or "").strip() for name, value in row.items()}
            if not any(cells.values()):
                continue  # a blank line
            if cells.get("depends_on"):
                collected.dependency({"tenant": cells.get("tenant"), "entity": cells["entity"], "depends_on": cells["depends_on"]}, where)
                if cells.get("kind"):
                    collected.entity({"tenant": cells.get("tenant"), "entity": cells["entity"], "kind": cells["kind"]}, where)
            else:
                collected.entity({"tenant": cells.get("tenant"), "entity": cells["entity"], "kind": cells.get("kind")}, where)


# ----------------------------------------------------------------------------------- from events' attributes


def graph_from_attributes(rows: Iterable[Mapping[str, Any]]) -> tuple[list[GraphEntity], list[Dependency]]:
    """The graph the events' attributes describe, de-duplicated (edges in the order first seen).

    Each row is an event's ``tenant``, ``entity`` and ``attributes`` (a dict, a JSON object as a
    string, or None):

    - ``kind``: the entity's kind, when it is one of the graph's kinds (the latest event's wins);
    - ``depends_on`` (a string or a list of strings): edges entity -> each of them;
    - ``host``: an edge entity -> host, the host being of kind "host";
    - ``site``: an edge to the site (kind "site"), from the host when one is given, else from the entity.

    Attributes are free-form producer data, so values of another shape (a kind that is no graph
    kind, a number where a name belongs) are ignored, and so is an edge from an entity to itself.
    The entities returned are those whose kind is known (given, or host/site); the others appear
    in edges only (loading creates them as "other", or keeps the kind they have). An attributes
    string that is not JSON raises ``ValueError`` naming the row.
    """
    given: dict[tuple[str, str], str] = {}  # kinds from the entities' own events, the latest winning
    implied: dict[tuple[str, str], str] = {}  # "host" / "site" from other entities' events
    edges: dict[tuple[str, str, str], Dependency] = {}

    def edge(tenant: str, entity: str, depends_on: str) -> None:
        if entity != depends_on:
            edges.setdefault((tenant, entity, depends_on), Dependency(tenant=tenant, entity=entity, depends_on=depends_on))

    for index, row in enumerate(rows):
        tenant, entity = row["tenant"], row["entity"]
        attributes = _attributes(row.get("attributes"), index, tenant, entity)
        if attributes.get("kind") in KINDS:
            given[(tenant, entity)] = attributes["kind"]
        depends_on = attributes.get("depends_on")
        for target in [depends_on] if isinstance(depends_on, str) else depends_on if isinstance(depends_on, list) else []:
            if isinstance(target, str) and target:
                edge(tenant, entity, target)
        host, site = (value if isinstance(value, str) and value else None for value in (attributes.get("host"), attributes.get("site")))
        if host:
            implied.setdefault((tenant, host), "host")
            edge(tenant, entity, host)
        if site:
            implied.setdefault((tenant, site), "site")
            edge(tenant, host or entity, site)
    kinds = {**implied, **given}
    entities = [GraphEntity(tenant=tenant, entity=entity, kind=kind) for (tenant, entity), kind in kinds.items()]
    return entities, list(edges.values())


def _attributes(value: Any, index: int, tenant: str, entity: str) -> Mapping[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"row {index} (tenant {tenant!r}, entity {entity!r}): attributes are not a JSON object ({error})") from error
    return value if isinstance(value, Mapping) else {}
