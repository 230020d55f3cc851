"""Tenant isolation, proven by walking the whole GraphQL schema (issue 14): tenant acme, calling as
admin (the most powerful role), neither sees nor changes anything of tenant globex through any field.

The schema is read by introspection through the app, so a field, argument or type added later is
walked without editing this file. Arguments get values by their type: strings from a pool of
globex's ids, names, entities, subject, cursor and PII token, acme's own, and values both tenants
hold (prediction ``p-3``, subject ``alice``, entity ``pump-0``); ids from its ids; each enum value;
a few ints and floats; booleans; times around the seeded rows and after them; input objects built
field by field; lists of none or one. Per field, every combination of its required arguments is
asked, the later pages of the first one answered without an error (its base) when the field is a
connection, then each value of each optional argument on the base. The selection goes from the
field's type down to every scalar.

Each answer acme gets must
- hold no value that only globex's rows hold (every string, time and fraction in globex's rows of
  every table, its models and its audit entries that acme's lack) and no string naming globex,
  except for values acme sends (acme's own audit trail records them, so any answer may echo them);
- fail, if at all, with NOT_FOUND or BAD_USER_INPUT;
- equal the answer to the same request with globex's names replaced by names nobody has: naming
  globex's things tells acme nothing about them, not even that they exist.
After every mutation globex's ensemble state in the router and its values in the token vault are as
they were, and so are its rows in every table that got a commit (the audit table, which every call
moves, after each mutation field); after the mutations globex reads through the API what it read
before them. Subscriptions: acme subscribes to every subscription field; globex's items published to the
live feed never reach it, acme's own do.

globex's secret predictions outnumber acme's in every analytics window and all have the same score,
so an aggregate that took them in would show that score.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from itertools import product
from typing import Any

import pyarrow as pa
import pytest
from graphql import get_introspection_query

from lakehouse import TABLES
from lakehouse.tables import AUDIT
from rtml.schemas import ModelStatus
from security.pii import Tokenized, Tokenizer
from security.tokenvault import TokenNotFound
from streaming.feed import prediction_items
from tests.auth import auth_headers
from tests.unit.test_api_graphql import BASE, ENTITIES, ROWS, World, prediction_rows

ATTACKER, VICTIM = "acme", "globex"
GHOST = "nosuch"  # stands for the victim in the twin of a request: names that nobody has
ALLOWED_CODES = {"NOT_FOUND", "BAD_USER_INPUT"}
SECRET_SCORE = 0.913  # the ensemble score of every secret prediction of the victim
MARK = {ATTACKER: 1.25, VICTIM: 913.5}  # each tenant's own number in its features, enrichments, weights, metrics
SHARED_ENTITY = ENTITIES[ATTACKER][0]  # an entity name both tenants use
MAX_DEPTH = 6  # selections go this deep below a root field
NESTED_PAGE = 2  # the `first` of paginated fields below the root
MAX_COMBINATIONS = 64  # of one field's required arguments (a deterministic sample beyond)
MAX_PAGES = 200  # of a listing read to its end (every call is audited: the audit trail grows by hundreds)
# Answer keys that change with every tenant's commits (the table-wide snapshot a cursor names, the
# table's snapshot history), left out when the victim's answers before and after a mutation are
# compared.
MOVED_BY_ANY_TENANT = {"cursor", "endCursor", "snapshotId", "snapshots"}


# the world ------------------------------------------------------------------------------------


def ask(world: World, tenant: str, query: str, variables: dict | None = None) -> dict:
    """The app's answer to ``query`` from an admin of ``tenant``."""
    response = world.client.post("/", json={"query": query, "variables": variables or {}}, headers=auth_headers(world.settings, tenant, "admin"))
    return response.json()


def answered(body: dict) -> dict:
    assert not body.get("errors"), body["errors"]
    return body["data"]


def secret_predictions(batch: int) -> pa.Table:
    """Thirty of the victim's predictions between its ordinary ones (at fractions of a second that
    no window boundary has), each anomalous with ``SECRET_SCORE``, about ``globex-secret-subject``."""
    rows = prediction_rows(VICTIM, range(ROWS), minute_offset=(batch + 1) / 4 + 0.0123456, ids=f"{VICTIM}-secret{batch}")
    for name, value in (("ensemble_score", SECRET_SCORE), ("is_anomaly", True), ("subject", f"{VICTIM}-secret-subject")):
        index = rows.schema.get_field_index(name)
        rows = rows.set_column(index, rows.schema.field(index), pa.array([value] * rows.num_rows, rows.schema.field(index).type))
    return rows


def tenant_rows(tenant: str) -> dict[str, list[dict]]:
    """The same kinds of rows for either tenant, under ids both use and ids naming the tenant."""
    at = BASE + timedelta(minutes=3)  # prediction p-3's event time, in both tenants
    mark = MARK[tenant]
    later = timedelta(seconds=17.123456)
    event = {"tenant": tenant, "entity": SHARED_ENTITY, "data_type": "metric", "event_time": at, "value": mark}
    enrichment = {"tenant": tenant, "event_id": "ev-p-3", "entity": SHARED_ENTITY, "source": "reasoning", "created_at": at + later}
    return {
        "events": [
            {**event, "event_id": "ev-shared", "attributes": {"note": f"{tenant}-secret-attribute"}, "subject": "alice"},
            {**event, "event_id": f"ev-{tenant}-secret", "subject": f"{tenant}-secret-subject"},
        ],
        "features": [
            {"tenant": tenant, "entity": SHARED_ENTITY, "window_start": at - timedelta(minutes=1), "window_end": at, "feature_set_version": "", "vector": [mark, mark + 1]}
        ],
        "feedback": [
            {"feedback_id": "fb-shared", "prediction_id": "p-3", "tenant": tenant, "is_anomaly": True, "comment": f"{tenant}-secret-feedback", "author": f"{tenant}-secret-author", "created_at": at + later}
        ],
        "enrichments": [
            {**enrichment, "enrichment_id": "enr-shared", "prediction_id": "p-3", "summary": f"{tenant}-secret-summary", "details": {"finding": f"{tenant}-secret-finding", "score": mark}, "subject": "alice"},
            {**enrichment, "enrichment_id": f"enr-{tenant}-secret", "prediction_id": f"{tenant}-secret0-3", "summary": f"{tenant}-secret-summary-2", "subject": f"{tenant}-secret-subject"},
        ],
    }


def pii_of(world: World, tenant: str) -> Tokenized:
    """The tenant's event document with personal data, tokenized as the first hop does it (tokens
    are deterministic: the same each time)."""
    document = {"subject": f"{tenant}-secret-subject", "attributes": {"email": f"{tenant}.secret@example.com", "note": "call +1 415 555 0100"}}
    return Tokenizer(world.settings).tokenize(tenant, document)


def email_token(world: World, tenant: str) -> str:
    return next(entry.token for entry in pii_of(world, tenant).entries if entry.kind == "email")


def seeded(home) -> World:
    """``World``'s two tenants (predictions under the same ids, their models), each also with rows
    in every table, a candidate model, feedback, a weight, a shadow rollout, an erasure and the audit
    entries of those, made through the API as the tenant, and an event with personal data whose
    tokens are in the token vault; the victim also with its secret predictions; and an operator's
    audit entry that no tenant may see (naming the victim, which the leak check looks for). The
    audit trail's writer commits every tenth of a second (not every second): the walk makes
    hundreds of changes, each answered once its entry is durable."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RTML_LAKEHOUSE__WRITER_FLUSH_SECONDS", "0.1")
        world = World(home)
    lake = world.lake
    for batch in range(3):
        lake.append_idempotent("predictions", secret_predictions(batch))
    candidate = {"status": ModelStatus.CANDIDATE, "metrics": {"mae": MARK[VICTIM]}, "artifact_uri": f"file:///models/{VICTIM}-rnn-2"}
    lake.registry.register(world.models[f"{VICTIM}-rnn@1"].model_copy(update=candidate))
    for tenant in (ATTACKER, VICTIM):
        for table, rows in tenant_rows(tenant).items():
            lake.append_idempotent(table, rows)
        pii = pii_of(world, tenant)
        world.access.token_vault().store(tenant, pii.entries)
        lake.append_idempotent("events", [{**tenant_rows(tenant)["events"][0], **pii.document, "event_id": "ev-pii"}])
        answered(ask(world, tenant, "mutation($c: String) { submitFeedback(verdicts: [{predictionId: \"p-3\", isAnomaly: true, comment: $c}]) { error } }", {"c": f"{tenant}-secret-comment"}))
        answered(ask(world, tenant, "mutation($w: [ModelWeightInput!]!) { setEnsembleWeights(weights: $w) { weight } }", {"w": [{"model": f"{tenant}-rnn@1", "weight": MARK[tenant]}]}))
        answered(ask(world, tenant, "mutation($m: String!) { startRollout(model: $m, mode: SHADOW, fraction: 0.25) { rollouts { model } } }", {"m": f"{tenant}-rnn@2"}))
        answered(ask(world, tenant, "mutation($s: String!) { requestErasure(subject: $s) { rowsRemoved } }", {"s": f"{tenant}-erased-subject"}))
    lake.audit(f"operator {VICTIM}-secret-operator", "maintain", "predictions", row_count=0, details={"note": f"{VICTIM}-secret-operator"})
    return world


def rows_of(world: World, tenant: str, tables: Iterable[str] = TABLES) -> dict[str, list[dict]]:
    """The rows of ``tables`` that belong to ``tenant``, sorted. A row belongs to its ``tenant``, an
    audit entry to the tenant its ``details`` name (as ``api.data`` decides)."""
    found = {}
    for name in tables:
        partitioned = TABLES[name].partition_by_tenant
        rows = world.lake.read(name, tenant=tenant if partitioned else None).to_pylist()
        mine = [row for row in rows if (row["tenant"] if "tenant" in row else json.loads(row.get("details") or "{}").get("tenant")) == tenant]
        if mine:
            found[name] = sorted(mine, key=lambda row: json.dumps(row, sort_keys=True, default=str))
    return found


def table_snapshots(world: World) -> dict[str, int | None]:
    """Every table's current snapshot: a table whose rows changed has a new one."""
    return {name: getattr(world.lake.table(name).current_snapshot(), "snapshot_id", None) for name in TABLES}


def router_state(world: World, keys: Collection[str]) -> dict:
    """The ensemble state of the models ``keys`` in the (in-process) router: rollouts, online accuracy."""
    operations = world.operations
    return {"rollouts": {key: trial for key, trial in operations.rollouts.items() if key in keys}, "accuracy": operations.accuracy.of(sorted(keys))}


def scalars(value: Any) -> Iterator[str | float]:
    """The strings and fractional numbers in ``value``, however nested (JSON text by what it holds),
    times as ISO 8601 text as the API writes them; whole numbers and booleans say too little to count."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value[:1] in ("{", "[") else value
        except ValueError:
            parsed = value
        yield from (value,) if parsed is value else scalars(parsed)
    elif isinstance(value, datetime):
        yield value.isoformat()
    elif isinstance(value, float) and not value.is_integer():
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from scalars(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from scalars(item)


def leaks(body: dict, forbidden: set, echoes: set) -> list:
    """The values in ``body`` that betray the victim: one of ``forbidden``, or a string naming the
    victim once the values the caller may have sent (``echoes``) are taken out of it."""
    sent = sorted((item for item in echoes if isinstance(item, str) and item), key=len, reverse=True)
    said = [body.get("data"), *((error.get("message"), error.get("extensions")) for error in body.get("errors") or ())]  # not paths: they name fields
    found = []
    for value in scalars(said):
        if value in echoes:
            continue
        if value in forbidden:
            found.append(value)
        elif isinstance(value, str):
            rest = value
            for echo in sent:
                rest = rest.replace(echo, "")
            if VICTIM in rest.lower():
                found.append(value)
    return found


def swapped(value: Any, old: str, new: str) -> Any:
    """``value`` with ``old`` replaced by ``new`` in every string in it."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {key: swapped(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [swapped(item, old, new) for item in value]
    return value


def codes(body: dict) -> set[str]:
    return {(error.get("extensions") or {}).get("code") for error in body.get("errors") or ()}


# the schema, by introspection -----------------------------------------------------------------


def printed(ref: dict) -> str:
    """A type reference as GraphQL writes it (``[VerdictInput!]!``)."""
    if ref["kind"] == "NON_NULL":
        return printed(ref["ofType"]) + "!"
    if ref["kind"] == "LIST":
        return f"[{printed(ref['ofType'])}]"
    return ref["name"]


def named(ref: dict) -> str:
    while ref["ofType"] is not None:
        ref = ref["ofType"]
    return ref["name"]


class Walk:
    """The introspected schema, and the calls to make of its root fields."""

    def __init__(self, introspection: dict, values: dict[str, list]):
        self.types = {item["name"]: item for item in introspection["types"]}
        self.roots = {
            operation: introspection[f"{operation}Type"]["name"] for operation in ("query", "mutation", "subscription") if introspection[f"{operation}Type"]
        }
        self.values = values  # scalar type name -> the values its arguments get

    def fields(self, operation: str) -> list[dict]:
        return self.types[self.roots[operation]]["fields"]

    def selection(self, ref: dict, depth: int = 0) -> str | None:
        """Every scalar below a field of type ``ref``, ``MAX_DEPTH`` deep: "" for a scalar, None
        for an object with nothing to select within the depth."""
        kind = self.types[named(ref)]["kind"]
        if kind in ("SCALAR", "ENUM"):
            return ""
        assert kind == "OBJECT", f"{named(ref)} is a {kind}: teach this walk to select its members (inline fragments)"
        if depth > MAX_DEPTH:
            return None
        parts = []
        for field in self.types[named(ref)]["fields"]:
            arguments = {argument["name"] for argument in field["args"]}
            required = {item["name"] for item in field["args"] if item["type"]["kind"] == "NON_NULL" and item["defaultValue"] is None}
            assert required <= {"first"}, f"{named(ref)}.{field['name']} needs arguments {required}: teach this walk to give them"
            below = self.selection(field["type"], depth + 1)
            if below is not None:
                parts.append(field["name"] + (f"(first: {NESTED_PAGE})" if "first" in arguments else "") + below)
        return " { " + " ".join(parts) + " }" if parts else None

    def candidates(self, ref: dict) -> list:
        """The values an argument or input field of type ``ref`` gets (null only by leaving it out)."""
        if ref["kind"] == "NON_NULL":
            return self.candidates(ref["ofType"])
        if ref["kind"] == "LIST":
            return [[], *([value] for value in self.candidates(ref["ofType"]))]
        described = self.types[ref["name"]]
        if described["kind"] == "ENUM":
            return [value["name"] for value in described["enumValues"]]
        if described["kind"] == "INPUT_OBJECT":
            # Every combination of its required fields, then each optional one once (with its
            # first value), which keeps the calls of a field taking a list of them few.
            required, optional = self.combinations(described["inputFields"], ref["name"])
            once: dict[str, Any] = {}
            for name, value in optional:
                once.setdefault(name, value)
            return [*required, *({**required[0], name: value} for name, value in once.items())]
        assert ref["name"] in self.values, f"no values for scalar {ref['name']}: add some to the walk's values"
        return self.values[ref["name"]]

    def combinations(self, inputs: list[dict], where: str) -> tuple[list[dict], list[tuple[str, Any]]]:
        """Every combination of the required ``inputs`` (a deterministic sample of
        ``MAX_COMBINATIONS`` when there are more), and each (name, value) of the optional ones."""
        needed = [item for item in inputs if item["type"]["kind"] == "NON_NULL" and item["defaultValue"] is None]
        names = [item["name"] for item in needed]
        required = [dict(zip(names, values)) for values in product(*(self.candidates(item["type"]) for item in needed))]
        if len(required) > MAX_COMBINATIONS:
            required = random.Random(where).sample(required, MAX_COMBINATIONS)
        optional = [(item["name"], value) for item in inputs if item not in needed for value in self.candidates(item["type"])]
        return required, optional

    def document(self, operation: str, field: dict, arguments: dict) -> str:
        declared = {argument["name"]: argument["type"] for argument in field["args"]}
        head = operation + (f"({', '.join(f'${name}: {printed(declared[name])}' for name in arguments)})" if arguments else "")
        call = f"({', '.join(f'{name}: ${name}' for name in arguments)})" if arguments else ""
        return f"{head} {{ {field['name']}{call}{self.selection(field['type'])} }}"

    def calls(self, operation: str, field: dict, send: Callable[[str, dict], dict]) -> Iterator[tuple[dict, dict]]:
        """(arguments, answer) of each call of a root field, made by ``send(document, variables)``:
        every combination of its required arguments, the later pages of the first combination
        answered without an error (the base), then each optional argument's every value on the base."""
        required, optional = self.combinations(field["args"], field["name"])
        base = page = None
        for arguments in required:
            body = send(self.document(operation, field, arguments), arguments)
            if base is None and not body.get("errors"):
                base, page = arguments, body
            yield arguments, body
        yield from self.later_pages(operation, field, base, page, send)
        base = required[0] if base is None else base
        for name, value in optional:
            arguments = {**base, name: value}
            yield arguments, send(self.document(operation, field, arguments), arguments)


    def later_pages(self, operation: str, field: dict, base: dict | None, page: dict | None, send: Callable[[str, dict], dict]) -> Iterator[tuple[dict, dict]]:
        """The pages after ``page``, the answer to ``base``, of a field that is a connection (its
        ``pageInfo`` says whether more follow, and its ``after`` argument takes their cursor)."""
        if "after" not in {argument["name"] for argument in field["args"]}:
            return
        for _ in range(MAX_PAGES):
            answer = ((page or {}).get("data") or {}).get(field["name"])
            info = answer.get("pageInfo") if isinstance(answer, dict) else None
            if not info or not info.get("hasNextPage"):
                return
            arguments = {**(base or {}), "after": info["endCursor"]}
            page = send(self.document(operation, field, arguments), arguments)
            yield arguments, page
        raise AssertionError(f"{field['name']} has more than {MAX_PAGES} pages: raise MAX_PAGES")


def walk_of(world: World) -> Walk:
    """The schema as the attacker introspects it, with argument values from the seeded world."""
    victim_cursor = answered(ask(world, VICTIM, "{ predictions(first: 1) { pageInfo { endCursor } } }"))["predictions"]["pageInfo"]["endCursor"]
    ids = [f"{VICTIM}-secret0-3", "p-3"]  # a prediction of the victim's only, and one that each tenant has
    strings = [
        *ids,
        ENTITIES[VICTIM][0],
        f"{VICTIM}-secret-subject",
        f"{VICTIM}-rnn",
        f"{VICTIM}-rnn@2",  # a candidate in a shadow rollout
        victim_cursor,
        email_token(world, VICTIM),  # a PII token of the victim's, in its token vault
        "alice",  # a subject both tenants have
        SHARED_ENTITY,
        f"{ATTACKER}-rnn",
        f"{ATTACKER}-rnn@2",
        email_token(world, ATTACKER),
    ]
    times = [BASE - timedelta(minutes=10), BASE + timedelta(minutes=15), BASE + timedelta(minutes=40), datetime.now(timezone.utc) + timedelta(days=1)]
    values = {
        "ID": ids,
        "String": strings,
        "Int": [600, 2, 0],  # 600 first: the first analytics answered (the base of its other calls) has few windows
        "Float": [0.25, 2.0],
        "Boolean": [True, False],
        "DateTime": [moment.isoformat() for moment in times],
    }
    return Walk(answered(ask(world, ATTACKER, get_introspection_query()))["__schema"], values)


def forbidden_values(world: World) -> set:
    """The values of the victim's rows that none of the attacker's hold. (Rows of no tenant hold
    the vocabulary of everyone's, such as store names; the seeded one names the victim instead.)"""
    return set(scalars(rows_of(world, VICTIM))) - set(scalars(rows_of(world, ATTACKER)))


def sendable(walk: Walk) -> set:
    """Every value the attacker may send in a walk (or its twins): its own audit trail records
    them, so any answer may echo any of them."""
    return set(scalars(walk.values)) | set(scalars(swapped(walk.values, VICTIM, GHOST)))


def check(body: dict, forbidden: set, echoes: set, what: str) -> None:
    assert codes(body) <= ALLOWED_CODES, (what, body["errors"])
    found = leaks(body, forbidden, echoes)
    assert not found, (what, found)


def ghost_of(arguments: dict) -> dict | None:
    """The arguments with the victim's names replaced by names nobody has (None: none named it)."""
    ghost = swapped(arguments, VICTIM, GHOST)
    return None if ghost == arguments else ghost


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    """One seeded world for every test here: the attacker's mutations change only its own data, so
    what each test asserts holds whichever of them ran before. Each tenant has read every query
    field once, so that both audit trails hold every kind of read (what only one tenant's rows
    hold counts as that tenant's)."""
    world = seeded(tmp_path_factory.mktemp("isolation"))
    walk = walk_of(world)
    for tenant in (ATTACKER, VICTIM):
        first_reads(world, walk, tenant)
    world.access.flush_audit(30)
    yield world
    world.access.close()  # nothing left for the audit writer's thread to commit at exit


# tests ----------------------------------------------------------------------------------------


def test_no_argument_or_input_field_lets_a_caller_name_a_tenant(world):
    walk = walk_of(world)
    named_tenant = [
        f"{name}.{field['name']}({argument['name']})"
        for name, described in walk.types.items()
        for field in described.get("fields") or ()
        for argument in field["args"]
        if "tenant" in argument["name"].lower()
    ] + [f"{name}.{item['name']}" for name, described in walk.types.items() for item in described.get("inputFields") or () if "tenant" in item["name"].lower()]
    assert named_tenant == []
    assert {"query", "mutation", "subscription"} <= walk.roots.keys()


def test_no_query_field_shows_the_attacker_anything_of_the_victim(world):
    walk = walk_of(world)
    forbidden, echoes = forbidden_values(world), sendable(walk)
    assert {f"{VICTIM}-secret1-3", ENTITIES[VICTIM][1], SECRET_SCORE, MARK[VICTIM]} <= forbidden - echoes  # what leaks would show
    for field in walk.fields("query"):
        answers = 0
        for arguments, body in walk.calls("query", field, lambda document, variables: ask(world, ATTACKER, document, variables)):
            what = f"{field['name']}({arguments})"
            check(body, forbidden, echoes, what)
            answers += not body.get("errors")
            ghost = ghost_of(arguments)
            if ghost is not None:
                assert swapped(ask(world, ATTACKER, walk.document("query", field, ghost), ghost), GHOST, VICTIM) == body, what
        assert answers, f"no call of {field['name']} was answered without an error: the walk did not read it"


def test_no_mutation_changes_anything_of_the_victim(world):
    walk = walk_of(world)
    forbidden, echoes = forbidden_values(world), sendable(walk)
    victim = Victim(world, walk)
    for field in walk.fields("mutation"):
        applied = 0
        for arguments, body in walk.calls("mutation", field, lambda document, variables: ask(world, ATTACKER, document, variables)):
            what = f"{field['name']}({arguments})"
            still = victim.settled(what)
            check(body, forbidden, echoes, what)
            applied += not body.get("errors")
            ghost = ghost_of(arguments)
            if still and ghost is not None:  # nothing changed: its twin is asked in the same state
                assert swapped(ask(world, ATTACKER, walk.document("mutation", field, ghost), ghost), GHOST, VICTIM) == body, what
                victim.settled(f"{what}, its twin")
        assert applied, f"no call of {field['name']} was answered without an error: the walk did not exercise it"
        world.access.flush_audit(30)
        victim.settled(f"{field['name']}, with the audit trail", audit=True)
    victim.reads_as_before("after every mutation")

    erased = walk.values["String"]
    later = secret_predictions(3).slice(0, len(erased))
    later = later.set_column(later.schema.get_field_index("subject"), "subject", pa.array(erased, pa.string()))
    assert world.lake.append_idempotent("predictions", later) == len(erased)  # the attacker's erasures withhold none of the victim's rows


class Victim:
    """What the victim has, to tell whether anything of it changed: its rows in every table, its
    ensemble state in the router, its values in the token vault, and what it reads through every
    query field."""

    def __init__(self, world: World, walk: Walk):
        self.world, self.walk = world, walk
        self.keys = {model.key for model in world.lake.registry.list(tenant=VICTIM)}
        self.tokens = [entry.token for entry in pii_of(world, VICTIM).entries]
        self.outside = self.outside_lakehouse()
        self.rows = rows_of(world, VICTIM)
        self.snapshots, self.moved = table_snapshots(world), self.router_moves()
        before = self.reads()
        self.expected = self.reads()
        # The victim's reads are in its audit trail, which it reads too: the answers its own
        # reading changes are compared in the lakehouse instead (``settled``).
        self.own = {name for name in before if before[name] != self.expected[name]}

    def outside_lakehouse(self) -> dict:
        """The victim's ensemble state in the router, and the values its tokens reveal in the vault
        (None: none any more)."""
        vault = self.world.access.token_vault()

        def revealed(token: str) -> str | None:
            try:
                return vault.reveal(VICTIM, token)
            except TokenNotFound:
                return None

        return {"router": router_state(self.world, self.keys), "vault": {token: revealed(token) for token in self.tokens}}

    def router_moves(self) -> str:
        """The in-process router's state of every tenant: it changes whenever the router does."""
        operations = self.world.operations
        return repr((operations.rollouts, operations.accuracy, operations.generation, operations.refreshes))

    def reads(self) -> dict:
        """What the victim reads through every query field (``first_reads``); its audit rows are
        taken as they are after, since they now hold those reads."""
        reads = first_reads(self.world, self.walk, VICTIM)
        self.world.access.flush_audit(30)
        self.rows[AUDIT.name] = rows_of(self.world, VICTIM, [AUDIT.name]).get(AUDIT.name, [])
        self.snapshots[AUDIT.name] = table_snapshots(self.world)[AUDIT.name]
        return reads

    def reads_as_before(self, what: str) -> None:
        now = self.reads()
        assert {name: now[name] for name in now.keys() - self.own} == {name: self.expected[name] for name in self.expected.keys() - self.own}, what

    def settled(self, what: str, audit: bool = False) -> bool:
        """Assert that the victim's state outside the lakehouse is as before, and its rows in every
        table that got a commit since the last look (the audit table, which every call moves, only
        with ``audit``); whether nothing but the audit trail moved since."""
        assert self.outside_lakehouse() == self.outside, what
        now, moved = table_snapshots(self.world), self.router_moves()
        changed = [name for name in TABLES if now[name] != self.snapshots[name] and (audit or name != AUDIT.name)]
        again = rows_of(self.world, VICTIM, changed)
        assert {name: again.get(name, []) for name in changed} == {name: self.rows.get(name, []) for name in changed}, what
        still = set(changed) <= {AUDIT.name} and moved == self.moved
        self.snapshots = {**now, **({} if audit else {AUDIT.name: self.snapshots[AUDIT.name]})}
        self.moved = moved
        return still


def first_reads(world: World, walk: Walk, tenant: str) -> dict:
    """What ``tenant`` reads through every query field (the first call of each it gets answered),
    without what every tenant's commits move (``MOVED_BY_ANY_TENANT``)."""

    def kept(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: kept(item) for key, item in value.items() if key not in MOVED_BY_ANY_TENANT}
        if isinstance(value, list):
            return [kept(item) for item in value]
        return value

    reads = {}
    for field in walk.fields("query"):
        if field["name"] in MOVED_BY_ANY_TENANT:
            continue
        for arguments, body in walk.calls("query", field, lambda document, variables: ask(world, tenant, document, variables)):
            if not body.get("errors"):
                reads[field["name"]] = (arguments, kept(body["data"]))
                break
    return reads


@pytest.mark.timeout(120)  # a delivery that never comes fails here, not at the session's limit
def test_no_subscription_delivers_the_attacker_the_victims_items(world):
    walk = walk_of(world)
    forbidden = forbidden_values(world)
    victims = tenant_rows(VICTIM)["enrichments"]
    sentinel = f"{ATTACKER}-live"
    mine = [{**row, "tenant": ATTACKER, "enrichment_id": sentinel, "prediction_id": sentinel} for row in tenant_rows(ATTACKER)["enrichments"][:1]]
    subscriptions = {field["name"]: field for field in walk.fields("subscription")}
    with world.client.websocket_connect("/", subprotocols=["graphql-transport-ws"]) as ws:
        ws.send_json({"type": "connection_init", "payload": auth_headers(world.settings, ATTACKER, "admin")})
        assert ws.receive_json() == {"type": "connection_ack"}
        for name, field in subscriptions.items():
            arguments = walk.combinations(field["args"], name)[0][0]
            ws.send_json({"id": name, "type": "subscribe", "payload": {"query": walk.document("subscription", field, arguments), "variables": arguments}})
        ws.send_json({"type": "ping"})  # answered once every subscribe before it is subscribed to the feed
        assert ws.receive_json() == {"type": "pong"}
        world.feed.publish("predictions", prediction_items(secret_predictions(0)) + prediction_items(prediction_rows(VICTIM, range(ROWS))))
        world.feed.publish("enrichments", victims)
        live = prediction_rows(ATTACKER, [7], ids=sentinel)
        world.feed.publish("predictions", [{**item, "is_anomaly": True} for item in prediction_items(live)])
        world.feed.publish("enrichments", mine)
        received: dict[str, list] = {name: [] for name in subscriptions}
        while not all(any(sentinel in json.dumps(item) for item in items) for items in received.values()):
            message = ws.receive_json()
            assert message["type"] == "next", message
            check(message["payload"], forbidden, set(), message["id"])
            received[message["id"]].append(message["payload"])
