"""PII detection and tokenization (security.pii): each detector's findings and non-findings, the
tokens (keyed, deterministic, normalised, not themselves PII), what a raw event document becomes,
redaction of free text and log records, the local and Vault transit keys; and the first hops that
tokenize: the API's ingestion (vault before log) and the stream's DataRouter (events, record
bodies, dead letters; records the API tokenized pass unchanged)."""

from __future__ import annotations

import base64
import logging
import random
import re

import hvac
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from stdnum import iban, luhn

from api.ingest import Ingestor
from lakehouse import Lakehouse
from rtml.errors import RtmlError
from rtml.settings import Settings
from security.pii import (
    DROPPED_TOO_DEEP,
    CiphertextRejected,
    LocalPiiKeys,
    RedactingFilter,
    Tokenizer,
    find_pii,
    redact_logs,
)
from security.tokenvault import TokenNotFound, TokenVault
from streaming.router import DataRouter, frame_headers
from streaming.sources.base import SourceBatch
from tests.doubles.vault import VaultDouble

TOKEN = re.compile(r"^tok_(email|phone|ip|card|iban|field|subject)_[a-z2-7]{26}$")
FIELDS = {"*": ["customer_name"], "acme": ["account", "address"]}


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    for variable in ("RTML_SECRET_PII_TOKEN_KEY", "RTML_SECRET_PII_ENCRYPTION_KEY"):
        monkeypatch.delenv(variable, raising=False)
    return Settings(home=tmp_path / "home", security={"pii_fields": FIELDS})


@pytest.fixture
def tokenizer(settings) -> Tokenizer:
    return Tokenizer(settings)


def kinds(text: str, region: str = "US") -> list[tuple[str, str]]:
    return [(finding.kind, finding.value) for finding in find_pii(text, region)]


# --- detectors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("mail bob@example.com now", "bob@example.com"),
        ("Bob.Smith+tag@Mail.Example.CO.UK", "bob.smith+tag@mail.example.co.uk"),
        ("<first_last-9@sub-domain.example.org>", "first_last-9@sub-domain.example.org"),
    ],
)
def test_emails_are_found_and_lower_cased(text, value):
    assert kinds(text) == [("email", value)]


@pytest.mark.parametrize("text", ["user@localhost", "@handle", "bob at example dot com", "a@b", "mailto:"])
def test_things_that_are_not_emails_are_not_found(text):
    assert kinds(text) == []


@pytest.mark.parametrize(
    "text, value",
    [
        ("call +1 415 555 2671 now", "+14155552671"),
        ("(415) 555-2671", "+14155552671"),
        ("415.555.2671", "+14155552671"),
        ("tel:+1-415-555-2671", "+14155552671"),
        ("+14155552671", "+14155552671"),
        ("office +44 20 7946 0958", "+442079460958"),
    ],
)
def test_phone_numbers_are_found_in_e164(text, value):
    assert kinds(text) == [("phone", value)]


def test_phone_numbers_without_a_country_code_are_read_in_the_configured_region():
    assert kinds("020 7946 0958", region="GB") == [("phone", "+442079460958")]
    assert kinds("020 7946 0958", region="US") == []


def test_an_unknown_phone_region_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(RtmlError, match="security.pii_phone_region is 'XX'"):
        Tokenizer(Settings(home=tmp_path, security={"pii_phone_region": "XX"}))


@pytest.mark.parametrize(
    "text",
    [
        "2024-01-05T10:00:00Z",
        "2024-01-05 10:00:00.123456+00:00",
        "2033-05-18",
        "sensor-12",
        "sensor-12/rack-7/slot-3",
        "3.14159265358979",
        "4155552671.5",
        "0.4155552671",
        "4155552671",  # a bare run of digits: an id or a time as likely as a phone
        "1712345678",
        "1712345678901",
        "1,234,567,890",
        "ref 4155-5526-71",
    ],
)
def test_times_ids_floats_and_bare_numbers_are_not_pii(text):
    assert kinds(text) == []


@pytest.mark.parametrize(
    "text, value",
    [
        ("from 10.0.0.1", "10.0.0.1"),
        ("192.168.1.254:8080", "192.168.1.254"),
        ("ip=2001:DB8:0:0:0:0:0:1,", "2001:db8::1"),
        ("fe80::1ff:fe23:4567:890a", "fe80::1ff:fe23:4567:890a"),
        ("::ffff:192.0.2.1", "::ffff:c000:201"),
        ("[::1]:443", "::1"),
    ],
)
def test_ip_addresses_are_found_in_canonical_form(text, value):
    assert kinds(text) == [("ip", value)]


@pytest.mark.parametrize("text", ["1.2.3", "999.1.1.1", "1.2.3.4.5", "v1.2.3.4.5", "10:00:00", "a :: b", "12:34:56.789", "00:1a:2b:3c:4d:5e"])
def test_things_that_are_not_ip_addresses_are_not_found(text):
    assert kinds(text) == []


@pytest.mark.parametrize(
    "text, value",
    [
        ("card 4111 1111 1111 1111 ok", "4111111111111111"),
        ("5500-0000-0000-0004", "5500000000000004"),
        ("amex 378282246310005", "378282246310005"),
        ("6011111111111117.", "6011111111111117"),
    ],
)
def test_card_numbers_are_found_as_their_digits(text, value):
    assert kinds(text) == [("card", value)]


@pytest.mark.parametrize("text", ["4111111111111112", "0.4111111111111111", "4111111111111111.5", "41111111111111110000"])
def test_luhn_invalid_or_embedded_numbers_are_not_cards(text):
    assert kinds(text) == []


@given(
    first=st.sampled_from("23456"),
    body=st.text("0123456789", min_size=11, max_size=17),
    separator=st.sampled_from(["", " ", "-"]),
)
def test_every_luhn_valid_card_number_is_found(first, body, separator):
    digits = first + body
    number = digits + luhn.calc_check_digit(digits)
    written = separator.join(number[i : i + 4] for i in range(0, len(number), 4))
    assert ("card", number) in kinds(f"paid with {written} today")


@given(st.text("0123456789", min_size=13, max_size=19))
def test_a_luhn_invalid_digit_string_is_never_a_card(digits):
    if not luhn.is_valid(digits):
        assert all(kind != "card" for kind, _ in kinds(digits))


def test_random_digit_strings_are_mostly_not_cards():
    draw = random.Random(14)
    strings = ["".join(draw.choice("0123456789") for _ in range(draw.randint(13, 19))) for _ in range(2000)]
    flagged = sum(any(kind == "card" for kind, _ in kinds(s)) for s in strings)
    # Half start 2-6 and a tenth of those pass Luhn: about 5 %; ids that are not cards stay.
    assert flagged < 0.08 * len(strings)


@pytest.mark.parametrize(
    "text, value",
    [
        ("IBAN DE89 3704 0044 0532 0130 00", "DE89370400440532013000"),
        ("pay GB82 WEST 1234 5698 7654 32 BY friday", "GB82WEST12345698765432"),
        ("NL91ABNA0417164300", "NL91ABNA0417164300"),
    ],
)
def test_ibans_are_found_compact(text, value):
    assert kinds(text) == [("iban", value)]


@pytest.mark.parametrize("text", ["DE88 3704 0044 0532 0130 00", "XX89 3704 0044 0532 0130 00", "DE89 3704"])
def test_ibans_with_a_wrong_check_or_country_are_not_found(text):
    assert all(kind != "iban" for kind, _ in kinds(text))


@given(st.text("0123456789", min_size=18, max_size=18))
def test_every_valid_german_iban_is_found_and_not_also_as_a_card(bban):
    number = "DE" + iban.calc_check_digits("DE00" + bban) + bban
    grouped = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    assert kinds(f"account {grouped}") == [("iban", number)]


def test_an_email_with_digits_is_one_email_not_also_a_phone():
    assert kinds("4155552671.x@example.com") == [("email", "4155552671.x@example.com")]


# --- tokens ----------------------------------------------------------------------------------


def test_tokens_name_their_kind_and_are_the_same_in_every_tenant_and_instance(settings):
    first, second = Tokenizer(settings), Tokenizer(settings)
    one = first.tokenize("acme", {"attributes": {"contact": "bob@example.com"}}).document["attributes"]["contact"]
    other = second.tokenize("globex", {"attributes": {"contact": "bob@example.com"}}).document["attributes"]["contact"]
    assert TOKEN.match(one) and one.startswith("tok_email_")
    assert one == other


def test_tokens_depend_on_the_key(settings, tmp_path):
    elsewhere = Settings(home=tmp_path / "elsewhere")  # another generated pii-token-key
    assert Tokenizer(settings).redact("bob@example.com") != Tokenizer(elsewhere).redact("bob@example.com")


def test_spellings_of_one_value_share_a_token(tokenizer):
    assert tokenizer.redact("Bob@Example.COM") == tokenizer.redact("bob@example.com")
    assert tokenizer.redact("(415) 555-2671") == tokenizer.redact("+1 415-555-2671")
    assert tokenizer.redact("DE89 3704 0044 0532 0130 00") == tokenizer.redact("DE89370400440532013000")


def test_the_same_value_of_two_kinds_gets_two_tokens(tokenizer):
    assert tokenizer.token("field", "10.0.0.1") != tokenizer.token("ip", "10.0.0.1")


@given(st.text(max_size=40))
@hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_tokens_are_not_pii(tokenizer, value):
    for kind in ("email", "phone", "ip", "card", "iban", "field", "subject"):
        token = tokenizer.token(kind, value)
        assert TOKEN.match(token)
        assert find_pii(f"x {token} {token}") == []


# --- documents -------------------------------------------------------------------------------


def event(**fields):
    return {"tenant": "acme", "entity": "sensor-12", "event_time": "2024-01-05T10:00:00Z", "value": 1.5, **fields}


def test_a_document_without_pii_is_returned_as_it_is(tokenizer):
    document = event(attributes={"unit": "C", "site": "plant-3", "reading_at": "2024-01-05T10:00:00Z", "ratio": "0.4155552671"})
    result = tokenizer.tokenize("acme", document)
    assert result.document is document and result.entries == []


def test_the_subject_is_always_tokenized_and_ties_every_entry(tokenizer):
    result = tokenizer.tokenize("acme", event(subject="user-42", attributes={"email": "bob@example.com"}))
    subject = result.document["subject"]
    assert subject == tokenizer.subject_token("user-42") and subject.startswith("tok_subject_")
    by_token = {entry.token: entry for entry in result.entries}
    assert by_token[subject].plaintext == "user-42" and by_token[subject].kind == "subject"
    email = result.document["attributes"]["email"]
    assert by_token[email].plaintext == "bob@example.com" and by_token[email].kind == "email"
    assert {entry.subject_token for entry in result.entries} == {subject}


def test_entries_of_a_document_without_subject_have_an_empty_subject_token(tokenizer):
    result = tokenizer.tokenize("acme", event(attributes={"ip": "10.1.2.3"}))
    assert [(entry.kind, entry.plaintext, entry.subject_token) for entry in result.entries] == [("ip", "10.1.2.3", "")]


def test_findings_are_replaced_inside_strings_lists_dicts_and_keys(tokenizer):
    attributes = {
        "note": "call +1 415 555 2671 or mail bob@example.com",
        "hops": ["10.0.0.1", {"peer": "2001:db8::1", "n": 3}],
        "bob@example.com": True,
        "ok": "plant-3",
    }
    result = tokenizer.tokenize("acme", event(attributes=attributes))
    text = orjson.dumps(result.document).decode()
    for plain in ("415 555 2671", "bob@example.com", "10.0.0.1", "2001:db8::1"):
        assert plain not in text
    new = result.document["attributes"]
    assert new["note"] == f"call {tokenizer.token('phone', '+14155552671')} or mail {tokenizer.token('email', 'bob@example.com')}"
    assert new["hops"][1]["n"] == 3 and new["ok"] == "plant-3"
    assert tokenizer.token("email", "bob@example.com") in new
    assert {entry.kind for entry in result.entries} == {"phone", "email", "ip"}


def test_an_entity_that_is_a_card_number_becomes_its_token_and_event_ids_are_scanned(tokenizer):
    result = tokenizer.tokenize("acme", event(entity="4111 1111 1111 1111", event_id="order:bob@example.com"))
    assert result.document["entity"] == tokenizer.token("card", "4111111111111111")
    assert result.document["event_id"] == "order:" + tokenizer.token("email", "bob@example.com")


def test_the_tenant_time_and_type_are_left_alone(tokenizer):
    document = event(data_type="record", event_time="2024-01-05T10:00:00+00:00")
    assert tokenizer.tokenize("acme", document).document is document


def test_named_fields_are_tokenized_whole_per_tenant(tokenizer):
    attributes = {"customer_name": "Bob Smith", "account": {"id": 7, "tier": "gold"}, "address": 12, "team": "red"}
    acme = tokenizer.tokenize("acme", event(attributes={**attributes, "nested": [{"address": "1 Main St"}]})).document["attributes"]
    assert acme["customer_name"] == tokenizer.token("field", "Bob Smith")
    assert acme["account"] == tokenizer.token("field", '{"id":7,"tier":"gold"}')
    assert acme["address"] == tokenizer.token("field", "12")
    assert acme["nested"][0]["address"] == tokenizer.token("field", "1 Main St")
    assert acme["team"] == "red"
    globex = tokenizer.tokenize("globex", event(tenant="globex", attributes=attributes)).document["attributes"]
    assert globex["customer_name"] == tokenizer.token("field", "Bob Smith")  # "*": every tenant
    assert globex["account"] == {"id": 7, "tier": "gold"} and globex["address"] == 12  # acme's names only


def test_tokenizing_twice_changes_nothing(tokenizer):
    document = event(
        subject="user-42",
        entity="4111111111111111",
        attributes={"customer_name": "Bob", "account": [1, 2], "note": "bob@example.com from 10.0.0.1", "iban": "DE89370400440532013000"},
    )
    once = tokenizer.tokenize("acme", document)
    twice = tokenizer.tokenize("acme", once.document)
    assert twice.document == once.document and twice.entries == []


def test_the_input_document_is_not_changed(tokenizer):
    document = event(subject="user-42", attributes={"email": "bob@example.com", "list": ["10.0.0.1"]})
    copy = orjson.loads(orjson.dumps(document))
    tokenizer.tokenize("acme", document)
    assert document == copy


@pytest.mark.parametrize(
    "document",
    [
        [1, 2],
        "bob@example.com",
        None,
        {"subject": 42, "attributes": "bob@example.com", "entity": ["x"], "value": "4111111111111111"},
        {"subject": "", "attributes": None, "event_time": 1.5},
        {"attributes": {"customer_name": float("nan"), 3: "bob@example.com", "big": 2**80}},
        {"attributes": {"customer_name": {"deep": 2**80}}},
    ],
)
def test_documents_of_the_wrong_shape_do_not_raise(tokenizer, document):
    result = tokenizer.tokenize("acme", document)
    assert "bob@example.com" not in repr(result.document)


def test_subjects_that_are_not_non_empty_strings_are_left_for_validation(tokenizer):
    assert tokenizer.tokenize("acme", event(subject=42)).document["subject"] == 42
    assert tokenizer.tokenize("acme", event(subject="")).document["subject"] == ""


def test_attributes_nested_too_deeply_are_dropped_not_walked(tokenizer):
    deep: object = "bob@example.com"
    for _ in range(2000):
        deep = [deep]
    result = tokenizer.tokenize("acme", event(attributes={"deep": deep}))
    walked, depth = result.document["attributes"]["deep"], 1
    while isinstance(walked, list):
        walked, depth = walked[0], depth + 1
    assert walked == DROPPED_TOO_DEEP and depth > 254  # still too deep for the event to validate


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
PII_TEXT = st.sampled_from(["bob@example.com", "+1 415 555 2671", "10.0.0.1", "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "plain"])


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "subject": JSON | PII_TEXT,
            "entity": JSON | PII_TEXT,
            "attributes": st.dictionaries(st.text(max_size=12) | st.just("customer_name"), JSON | PII_TEXT, max_size=5),
            "value": JSON,
        },
    )
)
@hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
def test_any_document_tokenizes_without_raising_and_once_only(tokenizer, document):
    once = tokenizer.tokenize("acme", document)
    twice = tokenizer.tokenize("acme", once.document)
    assert twice.document == once.document and twice.entries == []
    for plain in ("bob@example.com", "415 555 2671", "4111 1111 1111 1111", "DE89 3704"):
        assert plain not in repr(once.document)


# --- free text and logs ----------------------------------------------------------------------


def test_redact_replaces_findings_with_the_tokens_documents_get(tokenizer):
    line = "login failed for bob@example.com from 10.1.2.3 at 2024-01-05T10:00:00Z"
    redacted = tokenizer.redact(line)
    assert redacted == (
        f"login failed for {tokenizer.token('email', 'bob@example.com')} from {tokenizer.token('ip', '10.1.2.3')} at 2024-01-05T10:00:00Z"
    )
    assert tokenizer.redact("nothing to see at sensor-12") == "nothing to see at sensor-12"


def test_the_redacting_filter_cleans_messages_arguments_and_tracebacks(tokenizer):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(RedactingFilter(tokenizer))
    logger = logging.getLogger("test_security_pii.redacting")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("user %s logged in from %s", "bob@example.com", "10.1.2.3")
        try:
            raise ValueError("bad card 4111 1111 1111 1111")
        except ValueError:
            logger.exception("refused")
    finally:
        logger.removeHandler(handler)
    formatted = "\n".join(logging.Formatter().format(record) for record in records)
    assert "bob@example.com" not in formatted and "10.1.2.3" not in formatted and "4111 1111" not in formatted
    assert tokenizer.token("email", "bob@example.com") in formatted and tokenizer.token("card", "4111111111111111") in formatted


# --- local keys ------------------------------------------------------------------------------


def test_sealed_values_open_only_with_their_context_and_unaltered(settings):
    keys = LocalPiiKeys(settings)
    sealed = keys.seal(b"bob@example.com", b"acme\0tok_email_x")
    assert keys.unseal(sealed, b"acme\0tok_email_x") == b"bob@example.com"
    assert sealed != keys.seal(b"bob@example.com", b"acme\0tok_email_x")  # a fresh nonce each time
    with pytest.raises(CiphertextRejected, match="altered"):
        keys.unseal(sealed, b"globex\0tok_email_x")
    # One byte of the ciphertext flipped (not a base64 character: the last one may carry only padding bits).
    body = bytearray(base64.b64decode(sealed.removeprefix(LocalPiiKeys.PREFIX)))
    body[-1] ^= 0x01
    with pytest.raises(CiphertextRejected):
        keys.unseal(LocalPiiKeys.PREFIX + base64.b64encode(bytes(body)).decode(), b"acme\0tok_email_x")
    with pytest.raises(CiphertextRejected):
        keys.unseal("aesgcm:not base64!", b"acme\0tok_email_x")


# --- Vault transit keys ----------------------------------------------------------------------


def test_with_vault_tokens_are_transit_hmacs_the_same_in_every_instance(tmp_path, monkeypatch):
    with VaultDouble() as double:
        hvac.Client(url=double.url, token=double.root_token).secrets.transit.create_key("rtml-pii")
        monkeypatch.setenv("VAULT_TOKEN", double.root_token)
        chosen = {"secrets_provider": "vault", "vault_url": double.url, "vault_token_file": str(tmp_path / "no-token-file")}
        vault_settings = Settings(home=tmp_path / "home", security=chosen)
        first, second = Tokenizer(vault_settings), Tokenizer(vault_settings)
        token = first.redact("bob@example.com")
        assert TOKEN.match(token) and second.redact("Bob@example.com") == token
        first.redact("bob@example.com")  # remembered: no second request
        assert double.count("POST", "/v1/transit/hmac/rtml-pii") == 2
    assert Tokenizer(Settings(home=tmp_path / "home")).redact("bob@example.com") != token  # not the local key's


# --- the first hops: the API's ingestion and the stream's DataRouter -------------------------

ROUTES = {"metric": "stream", "image": "stream", "record": "batch"}
PII_EVENT = {
    "event_id": "e-1",
    "tenant": "acme",
    "entity": "10.0.0.7",
    "event_time": "2024-01-05T10:00:00Z",
    "value": 1.5,
    "subject": "user-42",
    "attributes": {"email": "bob@example.com", "account": "A-1"},
}
PLAIN = ("bob@example.com", "10.0.0.7", "user-42", "A-1")


def source_batch(payloads: list, headers: list | None = None) -> SourceBatch:
    count = len(payloads)
    return SourceBatch(list(payloads), np.zeros(count, np.int32), np.arange(count, dtype=np.int64), np.full(count, 100.0), headers or [])


def routed_text(routed) -> str:
    """Everything a routed batch would store, as text."""
    tables = [routed.metrics.events_table(), routed.landed.events_table(), routed.frames.events_table()]
    return repr([table.to_pylist() for table in tables]) + repr(routed.dead.payload)


def test_the_router_tokenizes_records_before_validation_and_lists_their_vault_entries(settings, tokenizer):
    routed = DataRouter(ROUTES, True, tokenizer).route(source_batch([orjson.dumps(PII_EVENT)]), ["log:0"])
    assert routed.metrics.entity.tolist() == [tokenizer.token("ip", "10.0.0.7")]
    assert routed.metrics.subject.tolist() == [tokenizer.subject_token("user-42")]
    assert all(plain not in routed_text(routed) for plain in PLAIN)
    kinds_stored = {(entry.kind, entry.plaintext) for entry in routed.vault_entries["acme"]}
    assert kinds_stored == {("ip", "10.0.0.7"), ("subject", "user-42"), ("email", "bob@example.com"), ("field", "A-1")}


def test_records_the_api_tokenized_route_unchanged_with_nothing_new_for_the_vault(settings, tokenizer):
    once = tokenizer.tokenize("acme", PII_EVENT).document
    router = DataRouter(ROUTES, True, tokenizer)
    again = router.route(source_batch([orjson.dumps(once)]), ["log:0"])
    untouched = DataRouter(ROUTES, True).route(source_batch([orjson.dumps(once)]), ["log:0"])
    assert again.metrics.events_table().equals(untouched.metrics.events_table())
    assert again.vault_entries == {"acme": []}


def test_dead_letters_keep_records_tokenized(settings, tokenizer):
    payloads = [
        b"not json: call +1 415 555 2671, mail bob@example.com",
        orjson.dumps({**PII_EVENT, "value": "not a number"}),
        orjson.dumps({**PII_EVENT, "tenant": "bad tenant!", "attributes": {"email": "bob@example.com"}}),  # acme's named fields do not apply
    ]
    routed = DataRouter(ROUTES, True, tokenizer).route(source_batch(payloads), ["log:0"])
    assert len(routed.dead) == 3
    assert routed.dead.payload[0] == f"not json: call {tokenizer.token('phone', '+14155552671')}, mail {tokenizer.token('email', 'bob@example.com')}".encode()
    refused = orjson.loads(routed.dead.payload[1])
    assert refused["attributes"]["email"] == tokenizer.token("email", "bob@example.com") and refused["value"] == "not a number"
    assert all(plain not in routed_text(routed) for plain in PLAIN + ("415 555 2671",))
    # Their tokens are in the vault too: under the record's tenant, or "" when it names no valid one.
    assert {entry.plaintext for entry in routed.vault_entries[""]} >= {"+14155552671", "bob@example.com", "user-42"}
    assert {entry.plaintext for entry in routed.vault_entries["acme"]} >= {"bob@example.com", "user-42"}


def test_a_record_frames_body_is_tokenized_and_an_images_pixels_are_not(settings, tokenizer):
    record = {"event_id": "r-1", "tenant": "acme", "entity": "orders", "data_type": "record", "event_time": "2024-01-05T10:00:00Z", "subject": "user-42"}
    image = {"event_id": "i-1", "tenant": "acme", "entity": "cam-1", "data_type": "image", "event_time": "2024-01-05T10:00:00Z", "attributes": {"frame_shape": [2, 8]}}
    pixels = b"4111111111111111"  # 16 pixels that read as a Luhn-valid card number
    routed = DataRouter(ROUTES, True, tokenizer).route(
        source_batch([b"ship to bob@example.com", pixels], [dict(frame_headers(record)), dict(frame_headers(image))]), ["log:0"]
    )
    # The stream takes no record frames (the API lands those): a dead letter, with its body tokenized.
    assert routed.dead.payload == [f"ship to {tokenizer.token('email', 'bob@example.com')}".encode()]
    assert routed.landed.events_table().to_pylist()[0]["payload"] == pixels
    body = [entry for entry in routed.vault_entries["acme"] if entry.kind == "email"]
    assert [(entry.plaintext, entry.subject_token) for entry in body] == [("bob@example.com", tokenizer.subject_token("user-42"))]


def test_the_api_tokenizes_a_record_events_body(settings, tokenizer):
    lake = Lakehouse.open(settings)
    ingestor = Ingestor(settings, CheckingLog(settings), lambda: lake.writer("events"))
    try:
        fields = {"entity": "orders", "data_type": "record", "event_time": "2024-01-05T10:00:00Z", "subject": "user-42"}
        assert ingestor.ingest_frame("acme", fields, b"ship to bob@example.com").accepted == 1
    finally:
        ingestor.close()
    [row] = lake.read("events", tenant="acme").to_pylist()
    assert row["payload"] == f"ship to {tokenizer.token('email', 'bob@example.com')}".encode()
    assert row["subject"] == tokenizer.subject_token("user-42")
    vault = TokenVault.open(settings)
    try:
        assert vault.reveal("acme", tokenizer.token("email", "bob@example.com")) == "bob@example.com"
    finally:
        vault.close()


class CheckingLog:
    """An event log that, on each append, checks that the token vault already reverses every token
    in the records, and keeps what it was given."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.values: list[bytes] = []

    def append(self, tenant: str, records) -> None:
        vault = TokenVault.open(self.settings)
        try:
            for record in records:
                for token in TOKEN_IN_TEXT.findall(record.value.decode()):
                    vault.reveal(tenant, token)  # raises TokenNotFound if the vault lagged behind
        finally:
            vault.close()
        self.values += [record.value for record in records]

    def close(self) -> None:
        pass


TOKEN_IN_TEXT = re.compile(r"tok_[a-z]+_[a-z2-7]{26}")


def test_the_api_stores_tokens_in_the_vault_before_the_log_gets_tokenized_events(settings, tokenizer):
    log = CheckingLog(settings)
    ingestor = Ingestor(settings, log, lambda: pytest.fail("no batch-path event was sent"))
    try:
        rejected_pii = {**PII_EVENT, "event_id": "e-2", "subject": "user-99", "value": "n/a"}
        result = ingestor.ingest_documents("acme", [{k: v for k, v in PII_EVENT.items() if k != "tenant"}, rejected_pii])
    finally:
        ingestor.close()
    assert result.accepted == 1 and [r.index for r in result.rejected] == [1]
    assert len(log.values) == 1 and all(plain not in log.values[0].decode() for plain in PLAIN)
    assert orjson.loads(log.values[0]) == tokenizer.tokenize("acme", PII_EVENT).document
    vault = TokenVault.open(settings)
    try:
        assert vault.reveal("acme", tokenizer.token("email", "bob@example.com")) == "bob@example.com"
        with pytest.raises(TokenNotFound):  # a rejected event's tokens are stored nowhere, so not in the vault
            vault.reveal("acme", tokenizer.subject_token("user-99"))
    finally:
        vault.close()


def test_redact_logs_filters_every_root_handler_once(tokenizer):
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        redact_logs(tokenizer)
        redact_logs(tokenizer)
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logging.getLogger("rtml.somewhere").warning("could not score %s for %s", "pump-1", "alice@example.com")
    finally:
        root.removeHandler(handler)
    assert lines == [f"could not score pump-1 for {tokenizer.token('email', 'alice@example.com')}"]
