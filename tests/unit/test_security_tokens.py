"""API tokens: what `security.tokens` accepts and refuses, each forged token also sent to the
GraphQL app (it must answer 401, never run the operation)."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api.tenancy import Authenticator
from rtml.schemas import Refusal
from rtml.settings import Settings
from security.tokens import AuthError, Role, TokenAuthority
from tests.unit.test_api_graphql import PAGE, World, codes


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("tokens-world"))


@pytest.fixture(scope="module")
def authority(world) -> TokenAuthority:
    return TokenAuthority(world.settings)


def _signing_key(world: World) -> ec.EllipticCurvePrivateKey:
    return serialization.load_pem_private_key((world.settings.home_dir / "keys" / "jwt-signing-key-k1").read_bytes(), password=None)


def _claims(world: World, **changes) -> dict:
    now = int(time.time())
    security = world.settings.security
    claims = {"iss": security.jwt_issuer, "aud": security.jwt_audience, "sub": "mallory", "iat": now, "nbf": now, "exp": now + 600, "jti": "j1", "tenant": "acme", "role": "admin"}
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def _unsigned(claims: dict) -> str:
    def part(document: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': 'k1'})}.{part(claims)}."


def _forged(world: World) -> dict[str, str]:
    """Every token an attacker or a broken client might send, by what is wrong with it."""
    key = _signing_key(world)
    now = int(time.time())
    leeway = int(world.settings.security.jwt_leeway_s)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    other_key = ec.generate_private_key(ec.SECP256R1())
    good = jwt.encode(_claims(world), key, algorithm="ES256", headers={"kid": "k1"})
    header, payload, signature = good.split(".")
    raised = json.loads(base64.urlsafe_b64decode(payload + "==")) | {"tenant": "globex"}
    tampered_payload = base64.urlsafe_b64encode(json.dumps(raised).encode()).decode().rstrip("=")
    return {
        "expired": jwt.encode(_claims(world, iat=now - 7200, nbf=now - 7200, exp=now - leeway - 5), key, algorithm="ES256", headers={"kid": "k1"}),
        "not yet valid": jwt.encode(_claims(world, nbf=now + leeway + 60), key, algorithm="ES256", headers={"kid": "k1"}),
        "wrong issuer": jwt.encode(_claims(world, iss="someone-else"), key, algorithm="ES256", headers={"kid": "k1"}),
        "wrong audience": jwt.encode(_claims(world, aud="another-api"), key, algorithm="ES256", headers={"kid": "k1"}),
        "alg none": _unsigned(_claims(world)),
        # The classic confusion: HMAC "signed" with the verifier's public key as the secret. PyJWT
        # refuses to use a PEM key as an HMAC secret, so the token is made by hand.
        "HS256 with the public key": _hs256(_claims(world), public_pem),
        "re-signed with another key": jwt.encode(_claims(world), other_key, algorithm="ES256", headers={"kid": "k1"}),
        "unknown key id": jwt.encode(_claims(world), key, algorithm="ES256", headers={"kid": "k9"}),
        "tampered payload": f"{header}.{tampered_payload}.{signature}",
        "no tenant claim": jwt.encode(_claims(world, tenant=None), key, algorithm="ES256", headers={"kid": "k1"}),
        "no expiry": jwt.encode(_claims(world, exp=None), key, algorithm="ES256", headers={"kid": "k1"}),
        "unknown role": jwt.encode(_claims(world, role="root"), key, algorithm="ES256", headers={"kid": "k1"}),
        "not a JWT": "hello",
    }


def _hs256(claims: dict, secret: bytes) -> str:
    import hashlib
    import hmac

    def part(document: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")

    signing_input = f"{part({'alg': 'HS256', 'typ': 'JWT', 'kid': 'k1'})}.{part(claims)}"
    signature = base64.urlsafe_b64encode(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()).decode().rstrip("=")
    return f"{signing_input}.{signature}"


def test_an_issued_token_proves_its_tenant_and_role(world, authority):
    principal = authority.verify(authority.issue("acme", Role.WRITER, "etl-job", ttl_s=60))
    assert (principal.tenant, principal.role, principal.subject) == ("acme", Role.WRITER, "etl-job")
    assert principal.expires_at - time.time() <= 60


def test_every_forged_token_is_refused_by_the_verifier_and_by_the_api(world, authority):
    for what, forged in _forged(world).items():
        with pytest.raises(AuthError) as refused:
            authority.verify(forged)
        assert refused.value.status == 401, what
        assert forged not in refused.value.reason, f"{what}: the reason echoes the token"
        response = world.client.post("/", json={"query": PAGE}, headers={"authorization": f"Bearer {forged}"})
        assert response.status_code == 401, what
        assert codes(response.json()) == ["UNAUTHENTICATED"], what
        assert response.json().get("data") is None, what


def test_the_reasons_say_what_is_wrong(world, authority):
    forged = _forged(world)
    reasons = {what: pytest.raises(AuthError, authority.verify, forged[what]).value.reason for what in ("expired", "not yet valid", "wrong issuer", "wrong audience", "alg none")}
    assert "expired" in reasons["expired"]
    assert "not valid yet" in reasons["not yet valid"]
    assert "issuer" in reasons["wrong issuer"]
    assert "audience" in reasons["wrong audience"]
    assert "ES256" in reasons["alg none"]


def test_clock_skew_within_the_leeway_is_tolerated_and_the_leeway_is_bounded(world, authority):
    key = _signing_key(world)
    now = int(time.time())
    slightly_early = jwt.encode(_claims(world, iat=now + 10, nbf=now + 10), key, algorithm="ES256", headers={"kid": "k1"})
    assert authority.verify(slightly_early).tenant == "acme"
    with pytest.raises(ValueError):
        Settings(security={"jwt_leeway_s": 3600})


def test_a_rotated_key_keeps_verifying_until_dropped_and_the_jwks_serves_both(tmp_path):
    old = Settings(home=tmp_path, security={"jwt_key_id": "k1"})
    token_of_old_key = TokenAuthority(old).issue("acme", "reader", "svc")
    rotated = Settings(home=tmp_path, security={"jwt_key_id": "k2", "jwt_previous_key_ids": ["k1"]})
    authority = TokenAuthority(rotated)
    assert authority.verify(token_of_old_key).tenant == "acme"
    new_token = authority.issue("acme", "reader", "svc")
    assert jwt.get_unverified_header(new_token)["kid"] == "k2"
    jwks = authority.jwks()
    assert [key["kid"] for key in jwks["keys"]] == ["k2", "k1"]
    assert all("d" not in key for key in jwks["keys"])  # public parts only
    # a verifier elsewhere checks the new token with the published key set alone
    published = {key["kid"]: jwt.PyJWK(key) for key in jwks["keys"]}
    claims = jwt.decode(new_token, published["k2"], algorithms=["ES256"], audience=rotated.security.jwt_audience)
    assert claims["tenant"] == "acme"
    dropped = TokenAuthority(Settings(home=tmp_path, security={"jwt_key_id": "k2"}))
    with pytest.raises(AuthError):
        dropped.verify(token_of_old_key)


def test_a_token_lives_no_longer_than_the_maximum(authority, world):
    with pytest.raises(ValueError, match="jwt_max_ttl_s"):
        authority.issue("acme", "reader", "svc", ttl_s=world.settings.security.jwt_max_ttl_s + 1)
    with pytest.raises(ValueError, match="tenant id"):
        authority.issue("not a tenant!", "reader", "svc")


def test_the_authenticator_turns_refusals_into_401_and_403(world):
    authenticator = Authenticator(world.settings)
    with pytest.raises(Refusal) as missing:
        authenticator.caller({})
    assert missing.value.status == 401 and "Authorization: Bearer" in missing.value.reason
    reader = TokenAuthority(world.settings).issue("acme", "reader", "r")
    principal = authenticator.caller({"Authorization": f"Bearer {reader}"})  # any letter case
    with pytest.raises(AuthError) as forbidden:
        principal.require(Role.ADMIN, "erasing")
    assert forbidden.value.status == 403 and "admin" in forbidden.value.reason
