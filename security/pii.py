"""Personal data in events: found, and replaced by deterministic keyed tokens before it is stored.

    tokenizer = Tokenizer(settings)
    result = tokenizer.tokenize("acme", document)   # a raw event document, before validation
    result.document                                 # the same event with tokens in place of PII
    result.entries                                  # what the token vault must hold to reverse them
    tokenizer.tokenize_bytes(body, result.subject_token)   # a free-form body, and its entries
    tokenizer.redact("login failed for bob@example.com")   # "login failed for tok_email_..."
    tokenizer.subject_token("user-42")              # how erasure finds a subject's rows
    handler.addFilter(RedactingFilter(tokenizer))   # log lines without PII

What is found (``find_pii``), in strings: email addresses; phone numbers (``phonenumbers``,
numbers without a country code read as ``security.pii_phone_region``'s; a bare run of digits is
not taken for one, so ids, counters and epoch times stay as they are); IPv4 and IPv6 addresses
(checked by ``ipaddress``); card numbers (13-19 digits, single spaces or dashes between them,
starting 2-6 as the card networks' numbers do, Luhn-valid: ``stdnum.luhn``; so epoch times in
milliseconds, which start with 1, are not taken for one); IBANs (upper-case, optionally grouped by
single spaces: ``stdnum.iban``). Where two findings overlap, the one found first in the order
email, IBAN, card, IP, phone wins (an IBAN's digits are not also a card number).

What a document becomes (``Tokenizer.tokenize``): its ``subject``, when a non-empty string, is
replaced by its token; every finding in the other top-level strings (``entity``, ``event_id``; not
``tenant``, ``data_type``, ``event_time``) and in every string of ``attributes`` (keys and values,
through lists and dicts) is replaced by its token; attributes named in ``security.pii_fields`` for
the tenant (or for ``"*"``) are replaced whole, whatever they hold. Nothing else changes and nothing
raises: a field of the wrong type is left for validation to refuse (in a document that is not an
object, every string is scanned, since it may still be kept as a dead letter).

Tokens are ``tok_<kind>_<26 lower-case base32 characters>``: the first 128 bits of
HMAC-SHA256(key, kind + "\\0" + normalised value). The same value gives the same token in every
tenant and process, so joins, windows and per-entity state keep working on tokens; without the
key a token cannot be reversed, and with it only by the token vault (``security.tokenvault``),
which keeps the normalised value (lower-case email, E.164 phone, compressed IP, card digits,
compact IBAN). Tokens are not PII: tokenizing a tokenized document changes nothing.

Keys (``open_pii_keys``): with ``security.secrets_provider = "vault"`` Vault's transit engine
(key ``security.pii_transit_key``) makes the HMACs and seals the vault's entries; otherwise the
local keys ``pii-token-key`` and ``pii-encryption-key`` (``security.keys``) do, with HMAC-SHA256
and AES-GCM.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import struct
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Protocol

import orjson
import phonenumbers
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from stdnum import iban, luhn

from rtml.errors import RtmlError
from rtml.settings import Settings
from security.keys import symmetric_key
from security.vault import VaultRefused, VaultTransit

TOKEN_KEY = "pii-token-key"
ENCRYPTION_KEY = "pii-encryption-key"
KINDS = ("email", "phone", "ip", "card", "iban", "field", "subject")
TOKEN_PATTERN = re.compile(rf"tok_(?:{'|'.join(KINDS)})_[a-z2-7]{{26}}")
# Attributes nested deeper than this are replaced by DROPPED_TOO_DEEP rather than walked: such an
# event cannot be stored anyway (rtml.schemas allows 254 levels), and a walk that deep would
# exhaust Python's stack. The marker keeps the document as invalid as it was.
MAX_DEPTH = 256
DROPPED_TOO_DEEP = "(nested too deeply: dropped by PII tokenization)"

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})(?![\w:])")
_CARD = re.compile(r"(?<![\d.])[2-6](?:[ -]?\d){12,18}(?!\d|\.\d)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_SEVEN_DIGITS = re.compile(r"\d(?:\D*\d){6}")
_SHORTEST_IBAN = 15
# Top-level fields that are never scanned: the caller's scope and what validation reads as is
# (the subject is tokenized whole instead).
_UNSCANNED = frozenset({"tenant", "data_type", "event_time", "subject"})


class CiphertextRejected(RtmlError):
    """A sealed value that does not open: altered, moved to another row, or sealed with another key."""


@dataclass(frozen=True, slots=True)
class Finding:
    """A piece of personal data in a string: ``text[start:end]``, of ``kind``, as ``value`` (normalised)."""

    start: int
    end: int
    kind: str
    value: str


@dataclass(frozen=True, slots=True)
class VaultEntry:
    """What the token vault keeps for one token of a document: the normalised ``plaintext`` behind
    ``token``, and the token of the document's subject (``""`` when it names none)."""

    token: str
    kind: str
    plaintext: str
    subject_token: str


@dataclass
class Tokenized:
    """A tokenized document (the input itself when it held nothing to replace), the vault entries
    of its tokens (one per distinct token) and the token of its subject (``""``: none)."""

    document: Any
    entries: list[VaultEntry]
    subject_token: str = ""


def find_pii(text: str, phone_region: str = "US") -> list[Finding]:
    """The personal data in ``text`` (module docstring), in text order, none overlapping another or
    an existing token. Cheap for strings that cannot hold any: each detector runs only when the
    text has what its findings need (an ``@``, seven digits, three dots, two colons)."""
    taken: list[Finding] = []
    if "tok_" in text:
        taken += [Finding(m.start(), m.end(), "token", m.group()) for m in TOKEN_PATTERN.finditer(text)]
    found: list[Finding] = []
    if "@" in text:
        found += [Finding(m.start(), m.end(), "email", m.group().lower()) for m in _EMAIL.finditer(text)]
    digits = _SEVEN_DIGITS.search(text) is not None
    if digits and len(text) >= _SHORTEST_IBAN:
        found += _ibans(text)
    if digits:
        found += [
            Finding(m.start(), m.end(), "card", number)
            for m in _CARD.finditer(text)
            if luhn.is_valid(number := re.sub(r"[ -]", "", m.group()))
        ]
    if text.count(":") >= 2:
        found += [Finding(m.start(), m.end(), "ip", address) for m in _IPV6.finditer(text) if (address := _ip(m.group()))]
    if text.count(".") >= 3:
        found += [Finding(m.start(), m.end(), "ip", address) for m in _IPV4.finditer(text) if (address := _ip(m.group()))]
    if digits:
        found += _phones(text, phone_region)
    for finding in found:  # in priority order: the first of overlapping findings wins
        if not any(finding.start < other.end and other.start < finding.end for other in taken):
            taken.append(finding)
    return sorted((finding for finding in taken if finding.kind != "token"), key=lambda finding: finding.start)


def _ibans(text: str) -> list[Finding]:
    found = []
    for match in _IBAN.finditer(text):
        # The pattern may run on into the next upper-case word: try the candidate, then shorter
        # ones ending at a group boundary.
        groups = match.group().split(" ")
        for count in range(len(groups), 0, -1):
            candidate = " ".join(groups[:count])
            if len(candidate) >= _SHORTEST_IBAN and iban.is_valid(candidate):
                found.append(Finding(match.start(), match.start() + len(candidate), "iban", iban.compact(candidate)))
                break
    return found


def _ip(candidate: str) -> str | None:
    """The address in canonical form, or None when ``candidate`` is not one (or is only ``::``)."""
    if not candidate.strip(":"):
        return None
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


def _phones(text: str, region: str) -> list[Finding]:
    matcher = phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.STRICT_GROUPING)
    return [
        Finding(match.start, match.end, "phone", phonenumbers.format_number(match.number, phonenumbers.PhoneNumberFormat.E164))
        for match in matcher
        if not match.raw_string.isdigit()  # a bare run of digits: more likely an id or a time than a phone
    ]


class PiiKeys(Protocol):
    """The keys behind tokens and the token vault: local keys or Vault's transit engine."""

    def mac(self, data: bytes) -> bytes:
        """A keyed digest of ``data``: the same bytes for the same data, in every process."""
        ...

    def seal(self, plaintext: bytes, context: bytes) -> str:
        """``plaintext`` encrypted and authenticated together with ``context`` (which is not stored)."""
        ...

    def unseal(self, ciphertext: str, context: bytes) -> bytes:
        """The plaintext ``seal`` got with this ``context``; raises ``CiphertextRejected`` otherwise."""
        ...


class LocalPiiKeys:
    """HMAC-SHA256 with the key ``pii-token-key``, AES-256-GCM with ``pii-encryption-key`` (with
    ``context`` as associated data). Each key is read on first use, so a process that only
    tokenizes never needs the encryption key."""

    PREFIX = "aesgcm:"

    def __init__(self, settings: Settings):
        self._settings = settings

    @cached_property
    def _mac_key(self) -> bytes:
        return symmetric_key(self._settings, TOKEN_KEY)

    @cached_property
    def _aead(self) -> AESGCM:
        return AESGCM(symmetric_key(self._settings, ENCRYPTION_KEY))

    def mac(self, data: bytes) -> bytes:
        return hmac.digest(self._mac_key, data, hashlib.sha256)

    def seal(self, plaintext: bytes, context: bytes) -> str:
        nonce = os.urandom(12)
        return self.PREFIX + base64.b64encode(nonce + self._aead.encrypt(nonce, plaintext, context)).decode()

    def unseal(self, ciphertext: str, context: bytes) -> bytes:
        try:
            sealed = base64.b64decode(ciphertext.removeprefix(self.PREFIX), validate=True)
            return self._aead.decrypt(sealed[:12], sealed[12:], context)
        except (InvalidTag, ValueError):
            raise CiphertextRejected(
                f"a sealed value does not open with the key {ENCRYPTION_KEY!r}: it was altered, copied from another "
                "row, or sealed with another key; restore the row or the key from a backup"
            ) from None


class VaultPiiKeys:
    """Vault's transit engine, one key for both: ``hmac`` for tokens, ``encrypt``/``decrypt`` for
    sealing. Transit seals without associated data here, so ``context`` travels inside the
    plaintext (length-prefixed) and is checked on opening."""

    def __init__(self, transit: VaultTransit, key_name: str):
        self._transit = transit
        self._key = key_name

    def mac(self, data: bytes) -> bytes:
        # "vault:v<version>:<base64 digest>": the digest is the token's source. Vault makes HMACs
        # with the key's latest version, so rotating this key changes every token from then on
        # (joins across the rotation break): rotate it only together with a re-tokenization.
        return base64.b64decode(self._transit.hmac(self._key, data).rsplit(":", 1)[-1])

    def seal(self, plaintext: bytes, context: bytes) -> str:
        return self._transit.encrypt(self._key, struct.pack(">I", len(context)) + context + plaintext)

    def unseal(self, ciphertext: str, context: bytes) -> bytes:
        try:
            opened = self._transit.decrypt(self._key, ciphertext)
        except VaultRefused as refused:  # altered, or sealed with another key: Vault's message says which
            raise CiphertextRejected(str(refused)) from refused
        head = struct.pack(">I", len(context)) + context
        if not opened.startswith(head):
            raise CiphertextRejected(
                f"a sealed value opened with the transit key {self._key!r} belongs to another row: it was copied or "
                "altered; restore the row from a backup"
            )
        return opened[len(head) :]


def open_pii_keys(settings: Settings) -> PiiKeys:
    """The keys ``security.secrets_provider`` implies: Vault transit for "vault", local otherwise."""
    if settings.security.secrets_provider == "vault":
        return VaultPiiKeys(VaultTransit(settings), settings.security.pii_transit_key)
    return LocalPiiKeys(settings)


class Tokenizer:
    """Finds PII in raw event documents and replaces it by tokens (module docstring). Thread-safe;
    it remembers (up to ``security.pii_cache_size``) the tokens of values and the results of
    strings it has seen, so a stream's repeated values cost one look-up."""

    def __init__(self, settings: Settings, keys: PiiKeys | None = None):
        security = settings.security
        self._keys = keys or open_pii_keys(settings)
        if security.pii_phone_region not in phonenumbers.SUPPORTED_REGIONS:
            raise RtmlError(
                f"security.pii_phone_region is {security.pii_phone_region!r}, not a region phone numbers are known for: "
                "set it to an ISO 3166 code such as 'US', 'GB' or 'DE'"
            )
        self._region = security.pii_phone_region
        self._fields = {tenant: frozenset(names) for tenant, names in security.pii_fields.items()}
        self._everywhere = self._fields.get("*", frozenset())
        self._token = lru_cache(maxsize=security.pii_cache_size)(self._make_token)
        self._replaced = lru_cache(maxsize=security.pii_cache_size)(self._replace)

    def tokenize(self, tenant: str, document: Any) -> Tokenized:
        """``document`` with its PII replaced by tokens, and the entries the vault needs (module
        docstring). Never raises on what the document holds; in a non-object (which validation
        refuses, and the stream keeps as a dead letter) every string is scanned."""
        found: dict[str, tuple[str, str]] = {}  # token -> (kind, normalised value)
        if not isinstance(document, dict):
            replaced = self._walk(document, frozenset(), found, 1)
            return Tokenized(replaced, [VaultEntry(token, kind, value, "") for token, (kind, value) in found.items()])
        changes: dict[str, Any] = {}
        subject = document.get("subject")
        subject_token = ""
        if isinstance(subject, str) and subject:
            subject_token = self.subject_token(subject)
            if subject_token != subject:
                changes["subject"] = subject_token
                found[subject_token] = ("subject", subject)
        named = self._everywhere | self._fields.get(tenant, frozenset())
        for name, value in document.items():
            if name not in _UNSCANNED:
                replaced = self._walk(value, named, found, 1) if name == "attributes" else self._text(value, found)
                if replaced is not value:
                    changes[name] = replaced
        entries = [VaultEntry(token, kind, value, subject_token) for token, (kind, value) in found.items()]
        return Tokenized({**document, **changes} if changes else document, entries, subject_token)

    def tokenize_bytes(self, payload: bytes, subject_token: str = "") -> tuple[bytes, list[VaultEntry]]:
        """A free-form payload (a record event's body, a record that is not JSON) with its findings
        replaced, and their vault entries under ``subject_token``. Bytes that are not UTF-8 are kept
        exactly as they are around the findings (read as surrogate escapes)."""
        text = payload.decode("utf-8", "surrogateescape")
        if not _may_hold_pii(text):
            return payload, []
        replaced, tokens = self._replace(text)
        return replaced.encode("utf-8", "surrogateescape"), [VaultEntry(token, kind, value, subject_token) for token, kind, value in dict.fromkeys(tokens)]

    def redact(self, text: str) -> str:
        """``text`` with each finding replaced by its token: for log lines and records that are not JSON."""
        return self._replace(text)[0] if _may_hold_pii(text) else text

    def forget_cached(self) -> None:
        """Forget every value and text remembered (an erasure: the caches hold plain values)."""
        self._token.cache_clear()
        self._replaced.cache_clear()

    def subject_token(self, subject: str) -> str:
        """The token that stands for the data subject ``subject`` everywhere (a token stays itself)."""
        return subject if TOKEN_PATTERN.fullmatch(subject) else self._token("subject", subject)

    def token(self, kind: str, value: str) -> str:
        """The token of the normalised ``value`` of ``kind`` (one of ``KINDS``)."""
        return self._token(kind, value)

    def _make_token(self, kind: str, value: str) -> str:
        digest = self._keys.mac(kind.encode() + b"\0" + value.encode("utf-8", "surrogatepass"))
        return f"tok_{kind}_{base64.b32encode(digest[:16]).decode().rstrip('=').lower()}"

    def _text(self, value: Any, found: dict[str, tuple[str, str]]) -> Any:
        if not isinstance(value, str) or not _may_hold_pii(value):
            return value
        text, tokens = self._replaced(value)
        for token, kind, plain in tokens:
            found[token] = (kind, plain)
        return text if tokens else value

    def _replace(self, text: str) -> tuple[str, tuple[tuple[str, str, str], ...]]:
        """``text`` with its findings replaced, and (token, kind, value) per finding."""
        findings = find_pii(text, self._region)
        if not findings:
            return text, ()
        parts, tokens, end = [], [], 0
        for finding in findings:
            token = self._token(finding.kind, finding.value)
            parts += [text[end : finding.start], token]
            tokens.append((token, finding.kind, finding.value))
            end = finding.end
        parts.append(text[end:])
        return "".join(parts), tuple(tokens)

    def _walk(self, value: Any, named: frozenset[str], found: dict[str, tuple[str, str]], depth: int) -> Any:
        """``value`` (within attributes) with its findings replaced; the same object when unchanged."""
        if isinstance(value, str):
            return self._text(value, found)
        if not isinstance(value, (dict, list)):
            return value
        if depth > MAX_DEPTH:
            return DROPPED_TOO_DEEP
        if isinstance(value, list):
            items = [self._walk(item, named, found, depth + 1) for item in value]
            return value if all(new is old for new, old in zip(items, value)) else items
        changed = False
        result = {}
        for key, item in value.items():
            new_key = self._text(key, found)
            new_item = self._whole(item, found) if key in named else self._walk(item, named, found, depth + 1)
            changed = changed or new_key is not key or new_item is not item
            result[new_key] = new_item
        return result if changed else value

    def _whole(self, value: Any, found: dict[str, tuple[str, str]]) -> Any:
        """The token of a named field's whole value (a token stays itself)."""
        if isinstance(value, str):
            if TOKEN_PATTERN.fullmatch(value):
                return value
            plain = value
        else:
            try:
                plain = orjson.dumps(value, default=str, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
            except orjson.JSONEncodeError:  # nested too deeply, or an integer beyond 64 bits: no store could keep it either
                plain = DROPPED_TOO_DEEP
        token = self._token("field", plain)
        found[token] = ("field", plain)
        return token


def _may_hold_pii(text: str) -> bool:
    """False for strings no detector can find anything in (most of a stream's strings): no ``@``,
    fewer than seven digits, fewer than three dots and two colons, and no token."""
    return (
        "@" in text
        or text.count(":") >= 2
        or text.count(".") >= 3
        or "tok_" in text
        or (len(text) >= 7 and _SEVEN_DIGITS.search(text) is not None)
    )


class RedactingFilter(logging.Filter):
    """A logging filter that replaces PII in each record's message by tokens, so that no log line
    carries it in plain text. Install it on the handlers that write logs:
    ``handler.addFilter(RedactingFilter(Tokenizer(settings)))``."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        self._tokenizer = tokenizer

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging's own error handling reports it
            return True
        redacted = self._tokenizer.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:  # what Formatter would print, redacted first
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._tokenizer.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self._tokenizer.redact(record.stack_info)
        return True


def redact_logs(tokenizer: Tokenizer) -> None:
    """Put a ``RedactingFilter`` on every handler of this process's root logger (once per
    handler): what the process logs is redacted whichever module logs it."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter(tokenizer))
