"""Issue 14's "Done when" for PII: personal data in an ingested event never appears in plain text in
any Parquet file, Kafka record written by rtml, search document, graph node or log line.

Events carrying emails, a phone number, IPv4 and IPv6 addresses, card numbers (Luhn-valid), an IBAN
and a tenant's named field (``security.pii_fields``) — in attributes, nested too; a card number as
an entity; an email as subject and inside an event id — come in both ways rtml takes them: through
the ingestion core (the ``Ingestor`` behind ``POST /v1/events``, appending to the Kafka event log)
and straight into Kafka as a producer writes them, malformed records among them. The stream
(``test_streaming_pipeline``'s Serve app and replay) scores them into the lakehouse, the agents
explain the anomalies (the enrichments stored, published on the live feed, indexed for search) and
``rtml graph load --from-events`` builds the graph from the events' attributes.

Then everything rtml wrote is scanned: every file under its home (the lakehouse's Parquet files
read as bytes and decoded with pyarrow, statistics included; Iceberg's Avro manifests with their
blocks decompressed; metadata JSON, the catalog, checkpoints, the token vault, the tantivy and kuzu
files), every record (key, value, headers) of every Kafka topic of the run except the producer's
own records, every search document and every term of the search index, every graph node and
edge, the test process's log records and every log file of the Ray session. No plain value, in
any of the forms a store might keep it (lower-cased, digits only, E.164, compact, ...), may appear;
and each store must hold the values' tokens, so the test cannot pass by storing nothing."""

from __future__ import annotations

import asyncio
import gc
import gzip
import ipaddress
import logging
import random
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import phonenumbers
import pytest
from stdnum import iban, luhn

from rtml.settings import Settings
from security.pii import Tokenizer
from tests.integration.test_streaming_pipeline import (  # noqa: F401 (stack is the Serve app fixture this module runs on)
    START,
    _assert_exactly_one_prediction_per_event,
    _records,
    _replay,
    _run_settings,
    stack,
)

NAMED_FIELD = "customer_name"  # acme's named field (security.pii_fields)
STEPS = 80  # readings per entity: five windows of the models' 16 values, and then some
SPIKES = range(56, 60)  # steps whose readings jump: the anomalies the agents explain
MALFORMED = ("not JSON", "a bad event time", "a JSON array")  # the producer's bad records (_malformed): dead letters


@dataclass(frozen=True)
class Pii:
    """The run's personal data: random, so that nothing another test wrote can be taken for it."""

    subject_email: str  # the subject of acme's events, in mixed case as people type it
    email: str
    phone: str  # US, written as people do
    ipv4: str
    ipv6: str  # upper-case, not compressed as far as it could be
    card_entity: str  # digits only: the entity of acme's ingested events
    card: str  # in groups of four: in attributes, and (dashed) the entity of globex's produced events
    iban: str  # in groups of four
    name: str  # acme's named field: nothing but the configuration says it is personal

    @classmethod
    def fresh(cls) -> Pii:
        rng = random.Random()  # seeded by the OS: new values every run
        marker = f"{rng.getrandbits(48):012x}"

        def card() -> str:
            digits = "4" + "".join(rng.choice("0123456789") for _ in range(14))
            return digits + luhn.calc_check_digit(digits)

        bban = "".join(rng.choice("0123456789") for _ in range(18))
        compact = f"DE{iban.calc_check_digits('DE00' + bban)}{bban}"
        return cls(
            subject_email=f"Alice.{marker}@Example.COM",
            email=f"bob.{marker}@mail.example.org",
            phone=f"+1 650-253-{rng.randrange(10000):04d}",
            ipv4=f"10.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}.{rng.randrange(100, 255)}",
            ipv6=f"2001:DB8:{rng.randrange(1, 0xFFFF):X}:0:0:0:{rng.randrange(1, 0xFFFF):X}:{rng.randrange(1, 0xFFFF):X}",
            card_entity=card(),
            card=_grouped(card(), " "),
            iban=_grouped(compact, " "),
            name=f"Zebulon Xylander {marker[::-1]}",
        )

    @property
    def card_dashed(self) -> str:
        return self.card.replace(" ", "-")

    def _normalised(self) -> dict[str, str]:
        """Each value as the tokenizer normalises it (security.pii's docstring): what its token is of."""
        phone = phonenumbers.format_number(phonenumbers.parse(self.phone, "US"), phonenumbers.PhoneNumberFormat.E164)
        return {
            "email": self.email.lower(),
            "phone": phone,
            "ipv4": self.ipv4,
            "ipv6": str(ipaddress.ip_address(self.ipv6)),
            "card_entity": self.card_entity,
            "card": self.card.replace(" ", ""),
            "iban": iban.compact(self.iban),
        }

    def forms(self) -> dict[str, set[str]]:
        """Each value with the forms a store might keep it in, searched case-insensitively: as
        written, normalised, digits only, grouped, and the random part of the emails and the name
        (so a value cut in pieces is caught too)."""
        normal = self._normalised()
        phone_digits = normal["phone"].removeprefix("+")
        ipv6 = ipaddress.ip_address(self.ipv6)
        return {
            "subject email": {self.subject_email, self.subject_email.split("@")[0]},
            "email": {self.email, self.email.split("@")[0]},
            "phone": {self.phone, normal["phone"], phone_digits, phone_digits[1:], self.phone.removeprefix("+1 ")},
            "ipv4": {self.ipv4},
            "ipv6": {self.ipv6, str(ipv6), ipv6.exploded},
            "card (entity)": {self.card_entity, _grouped(self.card_entity, " "), _grouped(self.card_entity, "-")},
            "card": {self.card, self.card_dashed, normal["card"]},
            "iban": {self.iban, normal["iban"]},
            "named field": {self.name, self.name.rsplit(" ", 1)[1]},
        }

    def tokens(self, tokenizer: Tokenizer) -> dict[str, str]:
        """The token each value must have become, by the same names as ``forms``."""
        normal = self._normalised()
        return {
            "subject email": tokenizer.subject_token(self.subject_email),
            "email": tokenizer.token("email", normal["email"]),
            "phone": tokenizer.token("phone", normal["phone"]),
            "ipv4": tokenizer.token("ip", normal["ipv4"]),
            "ipv6": tokenizer.token("ip", normal["ipv6"]),
            "card (entity)": tokenizer.token("card", normal["card_entity"]),
            "card": tokenizer.token("card", normal["card"]),
            "iban": tokenizer.token("iban", normal["iban"]),
            "named field": tokenizer.token("field", self.name),
        }


def _grouped(digits: str, separator: str) -> str:
    return separator.join(digits[i : i + 4] for i in range(0, len(digits), 4))


def _reading(step: int, rng: np.random.Generator) -> float:
    return float(np.sin(step / 20) + rng.normal(0, 0.1) + (6.0 if step in SPIKES else 0.0))


def _at(step: int) -> str:
    return (START + timedelta(seconds=5 * step)).isoformat()


def _ingested_events(run: str, pii: Pii) -> dict[str, list[dict]]:
    """What the API takes in, by tenant. acme: a sensor named by a card number, its subject an
    email, its attributes full of PII (and the graph's kind, host and dependency); globex: PII in
    attributes only."""
    rng = np.random.default_rng()
    acme = [
        {
            "event_id": f"{run}.login/{pii.subject_email}" if step == 0 else f"{run}.api.acme.{step}",
            "entity": pii.card_entity,
            "subject": pii.subject_email,
            "event_time": _at(step),
            "value": _reading(step, rng),
            "attributes": {
                "kind": "sensor",
                "host": pii.ipv4,
                "depends_on": [pii.ipv6],
                "contact": {"emails": [pii.email], "phone": pii.phone},
                "billing": {"card": pii.card, "iban": pii.iban, NAMED_FIELD: pii.name},
                NAMED_FIELD: pii.name,
            },
        }
        for step in range(STEPS)
    ]
    globex = [
        {
            "event_id": f"{run}.api.globex.{step}",
            "entity": "turbine-1",
            "event_time": _at(step),
            "value": _reading(step, rng),
            "attributes": {"operator": pii.email, "remote": pii.ipv6, "notes": [f"paid with {pii.card}"]},
        }
        for step in range(STEPS)
    ]
    return {"acme": acme, "globex": globex}


def _produced_events(run: str, pii: Pii) -> list[dict]:
    """What a producer writes straight into Kafka: a pump of acme's (depending on the sensor
    named by a card number, with the named field nested), and a globex machine named by a card
    number whose subject is a phone number."""
    rng = np.random.default_rng()
    events = []
    for step in range(STEPS):
        events.append(
            {
                "event_id": f"{run}.raw.acme.{step}",
                "tenant": "acme",
                "entity": "pump-7",
                "subject": pii.subject_email,
                "event_time": _at(step),
                "value": _reading(step, rng),
                "attributes": {"depends_on": pii.card_entity, "profile": {NAMED_FIELD: pii.name, "iban": pii.iban}},
            }
        )
        events.append(
            {
                "event_id": f"{run}.raw.globex/{pii.email}" if step == 0 else f"{run}.raw.globex.{step}",
                "tenant": "globex",
                "entity": pii.card_dashed,
                "subject": pii.phone,
                "event_time": _at(step),
                "value": _reading(step, rng),
                "attributes": {"ip": pii.ipv4, "note": f"refund to {pii.iban} for {pii.email}"},
            }
        )
    return events


def _malformed(pii: Pii) -> list[tuple[dict, bytes]]:
    """Records that cannot be events (``MALFORMED``, in order), each as (the event it names for its key, its bytes)."""
    return [
        ({"tenant": "acme", "entity": "pump-7"}, f'{{"tenant": "acme", "note": "call {pii.phone}, pay with {pii.card}", "mail": "{pii.email}"'.encode()),
        (
            {"tenant": "acme", "entity": pii.card_entity},
            orjson.dumps(
                {
                    "tenant": "acme",
                    "entity": pii.card_entity,
                    "event_time": "soon",
                    "value": 1.0,
                    "subject": pii.subject_email,
                    "attributes": {NAMED_FIELD: pii.name, "iban": pii.iban},
                }
            ),
        ),
        ({"tenant": "globex", "entity": "x"}, orjson.dumps([pii.email, pii.ipv4, pii.card])),
    ]


def _pii_settings(settings: Settings, run: str) -> Settings:
    """The run's settings: its own topics and consumer group over Kafka, acme's named field, and
    node timeouts that a loaded two-core machine meets (a partial enrichment would index less)."""
    settings = _run_settings(settings, run)
    security = settings.security.model_copy(update={"pii_fields": {"acme": [NAMED_FIELD]}})
    agents = settings.agents.model_copy(update={"search_timeout_s": 30.0, "graph_timeout_s": 30.0})
    return settings.model_copy(update={"security": security, "agents": agents})


def _agents_settings(settings: Settings, run: str) -> Settings:
    """The run's settings for agents in this process, as ``rtml agents explain`` runs them: the same
    lakehouse, their embedded search index and graph under a home of their own (``<home>/<run>``),
    since the Serve app's GraphAgent replica holds the kuzu database under the app's home."""
    from lakehouse.catalog import catalog_properties

    catalog = catalog_properties(settings.lakehouse, settings.home_dir)
    lakehouse = settings.lakehouse.model_copy(update={"catalog_uri": catalog["uri"], "warehouse": catalog["warehouse"]})
    return settings.model_copy(update={"home": settings.home_dir / run, "lakehouse": lakehouse})


def _ingest(settings: Settings, run: str, pii: Pii) -> tuple[dict[str, list[dict]], list[str]]:
    """The API's half: JSON events (two of them bad) and a record event with a free-form body
    (the batch path, straight into the lakehouse). Returns the events and the rejection reasons."""
    from api.ingest import Ingestor

    events = _ingested_events(run, pii)
    bad = [{"entity": pii.card_entity, "event_time": "soon", "value": 1.0, "subject": pii.subject_email, "attributes": {"mail": pii.email}}, [pii.email]]
    ingestor = Ingestor.open(settings)
    try:
        acme = ingestor.ingest_documents("acme", [*events["acme"], *bad])
        globex = ingestor.ingest_documents("globex", events["globex"])
        ticket = ingestor.ingest_frame(
            "acme",
            {
                "entity": "crm",
                "event_id": f"{run}.ticket",
                "event_time": _at(0),
                "data_type": "record",
                "subject": pii.subject_email,
                "attributes": orjson.dumps({NAMED_FIELD: pii.name}).decode(),
            },
            f"ticket from {pii.email}: call back on {pii.phone}, card {pii.card}".encode(),
        )
    finally:
        ingestor.close()
    assert [r.index for r in acme.rejected] == [STEPS, STEPS + 1] and globex.rejected == [] and ticket.rejected == []
    return events, [r.reason for r in acme.rejected]


def _produce(settings: Settings, run: str, pii: Pii) -> list[dict]:
    """The producer's half, written into the run's events topic after the Ingestor's records."""
    from streaming.sources.kafka import EventProducer

    events = _produced_events(run, pii)
    malformed = iter(_malformed(pii))
    producer = EventProducer(settings.kafka)
    try:
        for i, event in enumerate(events):
            producer.send(event)
            if i % 50 == 25:  # among the good ones, as a producer's mistakes come
                named, value = next(malformed)
                producer.send(named, value=value)
        producer.flush(timeout_s=30)
    finally:
        producer.close()
    return events


def _anomalies(lake, run: str) -> list:
    """The run's anomalous predictions, as the agents take them."""
    import pyarrow.compute as pc

    from rtml.schemas import Prediction

    rows = lake.read("predictions")
    rows = rows.filter(pc.and_(pc.starts_with(rows["event_id"], run + "."), rows["is_anomaly"]))
    return [
        Prediction.model_validate({**row, "scores": dict(row["scores"] or []), "model_versions": dict(row["model_versions"] or [])})
        for row in rows.to_pylist()
    ]


def _load_graph(settings: Settings, monkeypatch) -> None:
    """``rtml graph load --from-events`` for each tenant, with the run's settings."""
    from typer.testing import CliRunner

    from rtml.cli import app

    monkeypatch.setattr("rtml.settings.get_settings", lambda: settings)
    for tenant in ("acme", "globex"):
        outcome = CliRunner().invoke(app, ["graph", "load", "--from-events", "--tenant", tenant])
        assert outcome.exit_code == 0 and "merged" in outcome.output, outcome.output + repr(outcome.exception)


def _explain(settings: Settings, anomalies: list) -> None:
    """What the app's AgentGraph does with the stream's anomalies, in this process on the embedded
    backends: each incident explained, its enrichment stored, published on the live feed (Kafka
    topic ``<prefix>.enrichments``) and indexed for the Search agent. The kuzu database is let go
    at the end (its file lock with it), so that the scan can open it."""
    from agents.workers import GraphWorker, SearchWorker, in_threads, open_explainer
    from streaming.feed import open_feed

    feed = open_feed(settings)
    search = SearchWorker(settings)
    explainer, close = open_explainer(
        settings,
        *in_threads(search, GraphWorker(settings)),
        publish=lambda items: feed.publish("enrichments", items),
        index=lambda document: search.index([document]),
    )

    async def run() -> None:
        await explainer.observe(anomalies)
        await explainer.drain()

    try:
        asyncio.run(run())
        assert explainer.enrichments, "the agents stored no enrichment"
    finally:
        close()
        feed.close()
    # The GraphWorker is held by the explainer's nodes, which asyncio's finished tasks may keep in
    # reference cycles: collect them, so that kuzu closes the database and lets its lock go.
    del explainer, search
    gc.collect()


# -- the scan ---------------------------------------------------------------------------------


class Scan:
    """What each store holds, as lower-cased text (bytes read as latin-1, one character a byte, so
    that any ASCII value shows as itself)."""

    def __init__(self) -> None:
        self.stores: dict[str, list[tuple[str, str]]] = {}  # store -> (where in it, text)

    def add(self, store: str, content: Any, where: str = "") -> None:
        self.stores.setdefault(store, []).append((where, "\n".join(_strings(content)).lower()))

    def leaks(self, forms: dict[str, set[str]]) -> list[str]:
        """Where a form of a value shows: "<value> as <form> in <store> (<where>)"."""
        return [
            f"{what} as {form!r} in {store}" + (f" ({where})" if where else "")
            for store, texts in self.stores.items()
            for where, text in texts
            for what, written in forms.items()
            for form in sorted(written)
            if form.lower() in text
        ]

    def missing(self, store: str, tokens: dict[str, str], names: tuple[str, ...]) -> list[str]:
        """The named tokens that ``store`` does not hold. A token is known by its random part, since
        the search index keeps "tok_card_<random>" as the words "tok", "card" and "<random>"."""
        texts = [text for _, text in self.stores.get(store, [])]
        return [f"{name} ({tokens[name]}) not in {store}" for name in names if not any(tokens[name].rsplit("_", 1)[1] in text for text in texts)]


def _strings(value: Any) -> Iterator[str]:
    """Every string inside ``value`` (dicts, lists, tuples; bytes as latin-1; anything else as str)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        yield bytes(value).decode("latin-1")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _strings(item)
    elif value is not None:
        yield str(value)


def _scan_files(scan: Scan, root: Path) -> int:
    """Every file under ``root``: its path and bytes; Parquet decoded (values, statistics, schema
    metadata), Avro containers with their blocks decompressed, gzip unpacked. Returns how many files."""
    import pyarrow.parquet as pq

    files = [path for path in root.rglob("*") if path.is_file()]
    for path in files:
        data, name = path.read_bytes(), str(path.relative_to(root))
        scan.add("file names", name)
        scan.add("files (bytes)", data, name)
        if data[:2] == b"\x1f\x8b":
            scan.add("files (gunzipped)", gzip.decompress(data), name)
        if data[:4] == b"Obj\x01":
            scan.add("avro (decoded)", _avro_blocks(data), name)
        if data[:4] == b"PAR1":
            parquet = pq.ParquetFile(path)
            metadata = parquet.metadata
            statistics = [
                (stats.min, stats.max)
                for group in range(metadata.num_row_groups)
                for column in range(metadata.num_columns)
                if (stats := metadata.row_group(group).column(column).statistics) is not None and stats.has_min_max
            ]
            scan.add("parquet (decoded)", [parquet.schema_arrow.metadata, statistics, parquet.read().to_pylist()], name)
    return len(files)


def _avro_blocks(data: bytes) -> list[bytes]:
    """The header and decompressed data blocks of an Avro object container file (Iceberg's
    manifests and manifest lists): strings in them are their UTF-8 bytes once decompressed."""
    position = 4

    def long() -> int:
        nonlocal position
        shift = result = 0
        while True:
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return (result >> 1) ^ -(result & 1)

    def raw() -> bytes:
        nonlocal position
        size = long()
        position += size
        return data[position - size : position]

    metadata = {}
    while count := long():
        if count < 0:  # a block given with its size in bytes
            count = -count
            long()
        for _ in range(count):
            key = raw()
            metadata[key] = raw()
    position += 16  # the sync marker
    codec = metadata.get(b"avro.codec", b"null")
    blocks = [metadata[b"avro.schema"]]
    while position < len(data):
        long()  # objects in the block
        block = raw()
        position += 16
        if codec == b"deflate":
            block = zlib.decompress(block, -15)
        elif codec == b"zstandard":
            import zstandard

            block = zstandard.ZstdDecompressor().decompressobj().decompress(block)
        else:
            assert codec == b"null", f"an Avro codec this scan cannot open: {codec!r}"
        blocks.append(block)
    return blocks


def _scan_kafka(scan: Scan, settings: Settings, rtml_wrote_below: dict[str, int]) -> set[str]:
    """Every record (key, value, headers) of every topic of the run, but the producer's own
    records in the events topic (those at or beyond ``rtml_wrote_below``). Returns the topics."""
    from kafka import KafkaConsumer

    from streaming.sources.kafka import is_events_topic

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)
    try:
        topics = {topic for topic in consumer.topics() if topic.startswith(settings.kafka.topic_prefix + ".")}
    finally:
        consumer.close()
    for topic in topics:
        for record in _records(settings, topic):
            if is_events_topic(settings.kafka, topic) and record.offset >= rtml_wrote_below[f"{topic}:{record.partition}"]:
                continue  # written by the producer, not by rtml
            scan.add(f"kafka {topic}", [record.key, record.value, record.headers], f"{record.partition}@{record.offset}")
    return topics


def _scan_search(scan: Scan, settings: Settings) -> int:
    """Every document of the embedded search index (its stored fields) and every term it indexed."""
    import tantivy

    from agents.backends.search import MATCHED_FIELDS

    index = tantivy.Index.open(str(settings.home_dir / "agents" / "search" / settings.agents.search_index))
    index.reload()
    searcher = index.searcher()
    hits = searcher.search(tantivy.Query.all_query(), limit=max(searcher.num_docs, 1)).hits
    scan.add("search documents", [searcher.doc(address).to_dict() for _, address in hits])
    for field in ("key", "tenant", *MATCHED_FIELDS):
        scan.add("search terms", [term for term, _ in searcher.terms_with_prefix(field, "")])
    return searcher.num_docs


def _scan_graph(scan: Scan, settings: Settings) -> int:
    """Every node (all its properties) and edge of the embedded graph."""
    import kuzu

    from agents.backends.embedded_graph import DATABASE_FILE

    database = kuzu.Database(str(settings.home_dir / "agents" / "graph" / DATABASE_FILE), read_only=True)
    connection = kuzu.Connection(database)
    try:
        nodes = connection.execute("MATCH (n:Entity) RETURN n").get_all()
        edges = connection.execute("MATCH (a:Entity)-[:DEPENDS_ON]->(b:Entity) RETURN a.key, b.key").get_all()
    finally:
        connection.close()
        database.close()
    scan.add("graph", [nodes, edges])
    return len(nodes)


def _ray_log_dir() -> Path:
    """The log directory of the Ray session the tests run on (Ray has no public API that names it)."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


@pytest.mark.services
def test_pii_in_ingested_events_never_appears_in_plain_text_in_any_store(stack, kafka_bootstrap, caplog, monkeypatch):
    from streaming.sources import kafka

    caplog.set_level(logging.INFO)
    base, client, lake = stack
    run = f"rtml-pii-{uuid.uuid4().hex[:8]}"
    settings = _pii_settings(base, run)
    pii = Pii.fresh()
    tokenizer = Tokenizer(settings)
    tokens = pii.tokens(tokenizer)

    ingested, rejections = _ingest(settings, run, pii)
    rtml_wrote_below = kafka.log_end_offsets(settings.kafka)  # the Ingestor's records: every offset below these
    produced = _produce(settings, run, pii)
    stats, _ = _replay(settings, client)
    anomalies = _anomalies(lake, run)
    assert anomalies, "the spikes were not anomalies: the agents had nothing to explain"
    agents = _agents_settings(settings, run)
    _load_graph(agents, monkeypatch)
    _explain(agents, anomalies)

    scan = Scan()
    files = _scan_files(scan, settings.home_dir)
    topics = _scan_kafka(scan, settings, rtml_wrote_below)
    documents = _scan_search(scan, agents)
    nodes = _scan_graph(scan, agents)
    scan.add("ingestion's rejections", rejections)
    scan.add("log records (pytest)", [caplog.text, [(r.getMessage(), r.exc_text) for r in caplog.records]])
    ray_logs = [path for path in _ray_log_dir().rglob("*") if path.is_file()]
    for path in ray_logs:
        scan.add("log files (Ray session)", path.read_bytes(), where=path.name)

    leaks = scan.leaks(pii.forms())
    assert not leaks, f"{len(leaks)} plain values in stores:\n" + "\n".join(leaks)
    # The run did its work, everything was looked at, and each store holds the tokens in place of
    # the values: the scan did not pass on empty stores.
    assert sum(s["dead_letters"] for s in stats) == len(MALFORMED)
    in_event_ids = {pii.subject_email: tokenizer.token("email", pii.subject_email.lower()), pii.email: tokens["email"]}
    stored_ids = [_replaced(event["event_id"], in_event_ids) for event in [*ingested["acme"], *ingested["globex"], *produced]]
    _assert_exactly_one_prediction_per_event(lake, run, [{"event_id": event_id} for event_id in stored_ids])
    prefix = settings.kafka.topic_prefix
    assert topics == {f"{prefix}.events", settings.kafka.dead_letter_topic, f"{prefix}.predictions", f"{prefix}.enrichments"}
    assert files and documents and nodes and ray_logs and scan.stores["avro (decoded)"]
    everything = tuple(tokens)
    expected = {
        "parquet (decoded)": everything,
        "files (bytes)": ("card (entity)",),  # the checkpoints' window keys, uncompressed
        f"kafka {prefix}.events": everything,
        f"kafka {settings.kafka.dead_letter_topic}": ("subject email", "email", "phone", "ipv4", "card (entity)", "card", "iban", "named field"),
        f"kafka {prefix}.predictions": ("subject email", "card (entity)", "card"),
        f"kafka {prefix}.enrichments": ("card (entity)",),
        "search documents": ("card (entity)",),
        "search terms": ("card (entity)",),
        "graph": ("ipv4", "ipv6", "card (entity)"),
        "log records (pytest)": ("card (entity)",),  # the agents' alert names the entity
    }
    assert [gap for store, names in expected.items() for gap in scan.missing(store, tokens, names)] == []


def _replaced(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text
