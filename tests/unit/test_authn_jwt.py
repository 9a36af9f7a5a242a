"""authn: gateway, static and internal keys by hash; signed JWTs verified against their issuer, then cached.

Every refusal is a 401 `authentication_error` whose message says why without echoing the credential.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from poolgate.api.errors import ApiError
from poolgate.config import CallersConfig, ConfigError, JwtIssuerConfig, StaticKey
from poolgate.lifecycle.authn import Authenticator, looks_like_jwt
from poolgate.lifecycle.claims import NO_CLAIMS, CallerClaims, QuotaRule
from poolgate.lifecycle.context import Principal
from poolgate.store.repo import KeyRow, hash_key

SECRET = "s" * 40
ISSUER = "https://sso.example.com"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def bearer(token: str) -> dict[bytes, bytes]:
    return {b"authorization": f"Bearer {token}".encode()}


def claims_for(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {"iss": ISSUER, "aud": "poolgate", "sub": "alice", "iat": now, "exp": now + 600}
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def hs_issuer(**overrides: Any) -> JwtIssuerConfig:
    fields: dict[str, Any] = {
        "name": "sso",
        "issuer": ISSUER,
        "audience": ("poolgate",),
        "algorithms": ("HS256",),
        "secret": SECRET,
    }
    fields.update(overrides)
    return JwtIssuerConfig(**fields)


def authn_with(*issuers: JwtIssuerConfig) -> Authenticator:
    return Authenticator(CallersConfig(jwt_issuers=issuers))


def refused(authn: Authenticator, token: str) -> str:
    with pytest.raises(ApiError) as error:
        authn.authenticate(bearer(token))
    assert error.value.status == 401 and error.value.error_type == "authentication_error"
    assert token not in error.value.message and token[:40] not in error.value.message
    return error.value.message


def test_an_hs256_token_becomes_a_principal_with_its_claims_over_the_issuer_defaults() -> None:
    authn = authn_with(hs_issuer(defaults={"budget_usd": 5, "budget_range": "daily", "models": ["claude-*"]}))
    token = jwt.encode(
        claims_for(name="Alice A.", models=["claude-sonnet-*"], quotas=["requests=10/min"], chain="c-1"), SECRET
    )
    principal = authn.authenticate(bearer(token))
    assert (principal.id, principal.kind, principal.name) == ("sso:alice", "oauth_subject", "Alice A.")
    assert principal.claims == CallerClaims(
        models=("claude-sonnet-*",),
        quotas=(QuotaRule("requests", 10, "minute"),),
        budget_micro_usd=5_000_000,
        budget_range="daily",
        chain="c-1",
    )
    # x-api-key works the same (Claude Code's ANTHROPIC_API_KEY mode).
    assert authn.authenticate({b"x-api-key": token.encode()}) == principal


def test_rs256_from_a_pem_file_as_workload_identity(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    (tmp_path / "sso.pem").write_bytes(pem(rsa_key))
    authn = authn_with(
        hs_issuer(
            secret=None,
            algorithms=("RS256",),
            public_key_file=tmp_path / "sso.pem",
            kind="workload_identity",
            subject_claim="client_id",
            claim_mapping={"budget_usd": "https://poolgate.dev/budget", "models": "poolgate.models"},
        )
    )
    token = jwt.encode(
        claims_for(
            sub=None,
            client_id="ci-runner",
            **{"https://poolgate.dev/budget": "1.5", "poolgate": {"models": ["claude-haiku-*"]}},
        ),
        rsa_key,
        algorithm="RS256",
    )
    principal = authn.authenticate(bearer(token))
    assert (principal.id, principal.kind, principal.name) == ("sso:ci-runner", "workload_identity", "ci-runner")
    assert principal.claims.budget_micro_usd == 1_500_000 and principal.claims.models == ("claude-haiku-*",)


def test_es256_from_a_jwks_file_by_kid(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    other = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}, {**other, "kid": "k2"}]}))
    authn = authn_with(hs_issuer(secret=None, algorithms=("ES256",), jwks_file=tmp_path / "jwks.json"))
    good = jwt.encode(claims_for(), ec_key, algorithm="ES256", headers={"kid": "k1"})
    assert authn.authenticate(bearer(good)).id == "sso:alice"
    assert "does not verify" in refused(
        authn, jwt.encode(claims_for(), ec_key, algorithm="ES256", headers={"kid": "k2"})
    )
    assert "not in the issuer's JWKS" in refused(
        authn, jwt.encode(claims_for(), ec_key, algorithm="ES256", headers={"kid": "k9"})
    )
    with pytest.raises(ApiError) as unknown_kid:  # a token from before a key rotation: a fresh one may do
        authn.authenticate(bearer(jwt.encode(claims_for(), ec_key, algorithm="ES256", headers={"kid": "k9"})))
    assert unknown_kid.value.headers == []
    # No kid: each key is tried.
    assert authn.authenticate(bearer(jwt.encode(claims_for(sub="bob"), ec_key, algorithm="ES256"))).id == "sso:bob"


def jwk_of(private: Any) -> dict[str, Any]:
    kind = jwt.algorithms.RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    return json.loads(kind.to_jwk(private.public_key()))


@pytest.mark.parametrize("kid", [None, "shared"])
def test_every_key_of_a_jwks_verifies_tokens_when_kids_are_absent_or_repeat(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, kid: str | None
) -> None:
    """A JWKS whose keys name no kid (or the same one), an issuer rotating its keys: only the last key was
    kept, and tokens signed with the others were refused as "signature does not verify", silently locking
    out every caller of the old key. Each key the token's algorithm can use is tried, in the file's order."""
    old, new = rsa_key, rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p384 = ec.generate_private_key(ec.SECP384R1())  # an ES256 token is no P-384 key's: PyJWT's InvalidKeyError
    entries = [jwk_of(p384), jwk_of(old), jwk_of(ec_key), jwk_of(new)]
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**e, "kid": kid} if kid else e for e in entries]}))
    authn = authn_with(hs_issuer(secret=None, algorithms=("RS256", "ES256"), jwks_file=tmp_path / "jwks.json"))
    headers = {"kid": kid} if kid else None
    for sub, key, algorithm in (("a", old, "RS256"), ("b", new, "RS256"), ("c", ec_key, "ES256")):
        token = jwt.encode(claims_for(sub=sub), key, algorithm=algorithm, headers=headers)
        assert authn.authenticate(bearer(token)).id == f"sso:{sub}"
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "signature does not verify" in refused(
        authn, jwt.encode(claims_for(), stranger, algorithm="RS256", headers=headers)
    )
    # The right key still answers for the token's own faults.
    assert "expired" in refused(
        authn, jwt.encode(claims_for(exp=int(time.time()) - 3600), new, algorithm="RS256", headers=headers)
    )


@pytest.mark.parametrize("algorithms", [("RS256",), ("RS256", "ES256")])
def test_a_token_naming_a_key_of_another_type_in_the_jwks_is_refused_not_a_500(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, algorithms: tuple[str, ...]
) -> None:
    """A JWKS holds an RSA and an EC key while an issuer rotates. A forged RS256 token naming the EC key's
    kid (kids, issuer and audience are all public) made PyJWT raise a TypeError: a plain-text 500 and a
    traceback in the log, for a token nobody signed. It is a 401 like any token that does not verify."""
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**rsa_jwk, "kid": "r1"}, {**ec_jwk, "kid": "e1"}]}))
    authn = authn_with(hs_issuer(secret=None, algorithms=algorithms, jwks_file=tmp_path / "jwks.json"))
    assert authn.authenticate(bearer(jwt.encode(claims_for(), rsa_key, algorithm="RS256", headers={"kid": "r1"})))
    forged = jwt.encode(claims_for(), rsa_key, algorithm="RS256", headers={"kid": "e1"})
    assert "names a key that cannot verify RS256" in refused(authn, forged)


def test_a_token_without_a_kid_for_which_the_jwks_holds_no_key_of_its_type_is_refused(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk_of(rsa_key)]}))
    authn = authn_with(hs_issuer(secret=None, algorithms=("RS256", "ES256"), jwks_file=tmp_path / "jwks.json"))
    assert "holds no key that can verify ES256" in refused(authn, jwt.encode(claims_for(), ec_key, algorithm="ES256"))


def test_a_jwks_whose_key_holds_its_private_part_verifies_tokens(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """A JWKS entry with its private part (`d`) verifies with its public half, but the start-up check looked
    for public keys only: "none of its keys can verify RS256" stopped a gateway that `config check` passed."""
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key))
    assert "d" in rsa_jwk and "d" in ec_jwk
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**rsa_jwk, "kid": "r1"}, {**ec_jwk, "kid": "e1"}]}))
    for algorithm, key, kid in (("RS256", rsa_key, "r1"), ("ES256", ec_key, "e1")):
        authn = authn_with(hs_issuer(secret=None, algorithms=(algorithm,), jwks_file=tmp_path / "jwks.json"))
        good = jwt.encode(claims_for(), key, algorithm=algorithm, headers={"kid": kid})
        assert authn.authenticate(bearer(good)).id == "sso:alice"


def test_expired_tokens_are_refused_beyond_the_leeway() -> None:
    authn = authn_with(hs_issuer(leeway_seconds=60))
    now = int(time.time())
    assert authn.authenticate(bearer(jwt.encode(claims_for(exp=now - 30), SECRET))).id == "sso:alice"
    assert "expired" in refused(authn, jwt.encode(claims_for(exp=now - 3600), SECRET))
    assert "not valid yet (nbf)" in refused(authn, jwt.encode(claims_for(nbf=now + 3600), SECRET))
    assert "issued in the future (iat)" in refused(authn, jwt.encode(claims_for(iat=now + 3600), SECRET))
    assert "'exp' claim" in refused(authn, jwt.encode(claims_for(exp=None), SECRET))
    # Signed, and long expired past what a float holds: how long ago was a 500 (an OverflowError).
    assert "expired" in refused(authn, jwt.encode(claims_for(exp=-(10**400)), SECRET))


@pytest.mark.parametrize(
    ("claims", "says"),
    [
        # An `iat` that is no number read "issued in the future"; a subject that is no string "not valid".
        ({"iat": {"x": 1}}, "its 'iat' claim is not a number"),
        ({"nbf": "soon"}, "its 'nbf' claim is not a number"),
        ({"exp": "tomorrow"}, "its 'exp' claim is not a number"),
        # PyJWT takes digits in a string: a 400-digit one was accepted (an integer of as many was refused).
        ({"exp": "1" * 400}, "its 'exp' claim is not a number"),
        ({"exp": str(int(time.time()) + 600)}, "its 'exp' claim is not a number"),
        # PyJWT reads true as 1: `exp: true` was refused as expired, `nbf: true` and `iat: true` accepted.
        ({"exp": True}, "its 'exp' claim is not a number"),
        ({"nbf": True}, "its 'nbf' claim is not a number"),
        ({"iat": True}, "its 'iat' claim is not a number"),
        ({"nbf": False}, "its 'nbf' claim is not a number"),
        ({"nbf": "0"}, "its 'nbf' claim is not a number"),
        ({"nbf": str(int(time.time()) + 3600)}, "its 'nbf' claim is not a number"),
        ({"sub": True}, "its subject (sub) is not a string"),
        ({"sub": {"id": 1}}, "its subject (sub) is not a string"),
    ],
)
def test_claims_of_the_wrong_type_are_refused_saying_which(claims: dict[str, Any], says: str) -> None:
    assert says in refused(authn_with(hs_issuer()), jwt.encode(claims_for(**claims), SECRET))


def test_a_time_claim_that_is_a_boolean_is_refused_for_good() -> None:
    """`exp: true` read as 1 was refused as expired long ago; a fresh token from the same issuer writes it the
    same way, so the refusal tells the client not to retry."""
    with pytest.raises(ApiError) as error:
        authn_with(hs_issuer()).authenticate(bearer(jwt.encode(claims_for(exp=True), SECRET)))
    assert "expired" not in error.value.message
    assert (b"x-should-retry", b"false") in error.value.headers


def test_audience_issuer_and_signature_are_checked(rsa_key: rsa.RSAPrivateKey) -> None:
    authn = authn_with(hs_issuer())
    assert "audience" in refused(authn, jwt.encode(claims_for(aud="another-service"), SECRET))
    assert "'aud' claim" in refused(authn, jwt.encode(claims_for(aud=None), SECRET))
    assert "issuer (iss) is not accepted" in refused(authn, jwt.encode(claims_for(iss="https://evil"), SECRET))
    assert "issuer (iss) is not accepted" in refused(authn, jwt.encode(claims_for(iss=None), SECRET))
    assert "signature does not verify" in refused(authn, jwt.encode(claims_for(), "x" * 40))
    # A payload swapped under a valid signature.
    header, _, signature = jwt.encode(claims_for(), SECRET).split(".")
    forged_payload = jwt.encode(claims_for(sub="root"), "x" * 40).split(".")[1]
    assert "signature does not verify" in refused(authn, f"{header}.{forged_payload}.{signature}")
    # alg=none and an algorithm the issuer does not use.
    unsigned = jwt.encode(claims_for(), None, algorithm="none")
    assert "algorithm" in refused(authn, unsigned)
    assert "algorithm" in refused(authn, jwt.encode(claims_for(), SECRET + "x" * 30, algorithm="HS512"))
    assert "malformed" in refused(authn, "eyJhbGciOi.not-json.at-all")


def hs256_by_hand(header: bytes, payload: bytes, secret: bytes) -> str:
    """A token with exactly these header and payload bytes (PyJWT would write them its own way)."""
    signing = jwt.utils.base64url_encode(header) + b"." + jwt.utils.base64url_encode(payload)
    return (signing + b"." + jwt.utils.base64url_encode(hmac.new(secret, signing, hashlib.sha256).digest())).decode()


def test_a_tokens_header_and_claims_are_read_one_way_only(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    """What an attacker varies in a token's header and claims: `alg` in another case or absent, an audience
    list, keys written twice (the issuer picked by the unverified read is the one verified, and the claims are
    those verified), and an HS256 token signed with a JWKS's public key."""
    authn = authn_with(hs_issuer())
    now = int(time.time())
    claims = b'"aud":"poolgate","exp":%d' % (now + 600)
    for header in (b'{"alg":"hs256"}', b'{"typ":"JWT"}', b'{"alg":"HS256","alg":"none"}'):
        payload = b'{"iss":"%s","sub":"alice",%s}' % (ISSUER.encode(), claims)
        assert "algorithm" in refused(authn, hs256_by_hand(header, payload, SECRET.encode()))
    assert authn.authenticate(bearer(jwt.encode(claims_for(aud=["other", "poolgate"]), SECRET))).id == "sso:alice"
    assert "audience" in refused(authn, jwt.encode(claims_for(aud=["other", "another"]), SECRET))
    twice = b'{"iss":"https://evil","iss":"%s","sub":"root","sub":"bob",%s}' % (ISSUER.encode(), claims)
    assert authn.authenticate(bearer(hs256_by_hand(b'{"alg":"HS256"}', twice, SECRET.encode()))).id == "sso:bob"
    twice = b'{"iss":"%s","iss":"https://evil","sub":"bob",%s}' % (ISSUER.encode(), claims)
    assert "issuer (iss) is not accepted" in refused(authn, hs256_by_hand(b'{"alg":"HS256"}', twice, SECRET.encode()))
    jwk = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "k1"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    authn = authn_with(hs_issuer(secret=None, algorithms=("ES256",), jwks_file=tmp_path / "jwks.json"))
    payload = b'{"iss":"%s","sub":"alice",%s}' % (ISSUER.encode(), claims)
    for public in (json.dumps(jwk).encode(), pem(ec_key)):
        assert "algorithm" in refused(authn, hs256_by_hand(b'{"alg":"HS256","kid":"k1"}', payload, public))


def test_an_rsa_public_key_cannot_be_used_as_an_hmac_secret(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    public = pem(rsa_key)
    (tmp_path / "sso.pem").write_bytes(public)
    authn = authn_with(hs_issuer(secret=None, algorithms=("RS256",), public_key_file=tmp_path / "sso.pem"))
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}').decode()
    body = jwt.utils.base64url_encode(json.dumps(claims_for()).encode()).decode()
    signature = jwt.utils.base64url_encode(
        hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest()
    ).decode()
    assert "algorithm" in refused(authn, f"{header}.{body}.{signature}")


def test_unusable_claims_refuse_the_token_rather_than_drop_the_limit() -> None:
    authn = authn_with(hs_issuer())
    message = refused(authn, jwt.encode(claims_for(budget_usd="lots"), SECRET))
    assert "budget_usd" in message
    assert "'sub' claim" in refused(authn, jwt.encode(claims_for(sub=None), SECRET))


def test_only_an_absent_or_null_claim_takes_the_issuers_default() -> None:
    authn = authn_with(hs_issuer(defaults={"budget_usd": 5, "budget_range": "daily", "budget_scope": "per_session"}))
    kept = authn.authenticate(bearer(jwt.encode({**claims_for(), "budget_range": None, "chain": 42}, SECRET))).claims
    assert (kept.budget_range, kept.budget_scope, kept.chain) == ("daily", "per_session", "42")
    assert "budget_range: '' is not one of" in refused(authn, jwt.encode(claims_for(budget_range=""), SECRET))
    assert "budget_scope: False is not one of" in refused(authn, jwt.encode(claims_for(budget_scope=False), SECRET))
    assert "chain: expected a string" in refused(authn, jwt.encode(claims_for(sub="bob", chain=True), SECRET))


def test_a_token_with_empty_quotas_is_refused_rather_than_lift_the_issuers_quotas() -> None:
    """`quotas: []` (an identity provider writing an empty list for a user without quotas of their own) was
    read as no quota at all, lifting the issuer's default quotas; an absent or null claim keeps them, as README
    says of every claim, and a given but empty one is refused, as `models: []` and `budget_range: ""` are."""
    authn = authn_with(hs_issuer(defaults={"quotas": ["requests=5/min"]}))
    for kept in (claims_for(), {**claims_for(sub="bob"), "quotas": None}):
        quotas = authn.authenticate(bearer(jwt.encode(kept, SECRET))).claims.quotas
        assert [rule.spec() for rule in quotas] == ["requests=5/minute"]
    for empty in ([], {}, "", " "):
        message = refused(authn, jwt.encode({**claims_for(sub="carol"), "quotas": empty}, SECRET))
        assert "quotas: given but empty" in message
    assert authn.authenticate(bearer(jwt.encode(claims_for(sub="dan", quotas=["requests=9/h"]), SECRET)))
    # Without default quotas, an empty list lifts nothing: no quota, as it says.
    unlimited = authn_with(hs_issuer()).authenticate(bearer(jwt.encode(claims_for(quotas=[]), SECRET)))
    assert unlimited.claims.quotas == ()


def test_no_subject_can_take_the_id_of_a_hashed_one() -> None:
    """A subject too long for an id is hashed to `<issuer>:h:<hash>`; the subject `h:<hash>`, written out, got
    that very id, and with it the long subject's budget, quotas and ledger rows."""
    authn = authn_with(hs_issuer())
    long_subject = "victim-" + "v" * 80
    hashed = authn.authenticate(bearer(jwt.encode(claims_for(sub=long_subject), SECRET))).id
    assert hashed == f"sso:h:{hashlib.sha256(long_subject.encode()).hexdigest()[:32]}"
    lookalike = authn.authenticate(bearer(jwt.encode(claims_for(sub=hashed.removeprefix("sso:")), SECRET))).id
    assert lookalike != hashed and lookalike.startswith("sso:h:") and len(lookalike) <= 64
    # Other subjects keep their ids (budgets are seeded from the ledger by id).
    assert authn.authenticate(bearer(jwt.encode(claims_for(sub="hugo:h"), SECRET))).id == "sso:hugo:h"


def test_a_verified_token_is_cached_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    authn = authn_with(hs_issuer(leeway_seconds=0))
    token = jwt.encode(claims_for(), SECRET)
    first = authn.authenticate(bearer(token))
    calls = 0
    original = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    assert authn.authenticate(bearer(token)) is first
    assert calls == 0
    # Past the cached expiry the token is checked again (and, being still valid here, accepted again).
    principal, _ = authn._tokens[token]
    authn._tokens[token] = (principal, time.time() - 1)
    assert authn.authenticate(bearer(token)) == first
    assert calls > 0


def test_bad_key_material_fails_at_startup_not_per_request(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    (tmp_path / "bad.json").write_text('{"keys": []}')
    with pytest.raises(ConfigError, match="not a PEM public key"):
        authn_with(hs_issuer(secret=None, algorithms=("RS256",), public_key_file=tmp_path / "bad.pem"))
    with pytest.raises(ConfigError, match="not a usable JWKS"):
        authn_with(hs_issuer(secret=None, algorithms=("RS256",), jwks_file=tmp_path / "bad.json"))
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ConfigError, match="cannot verify RS256"):
        authn_with(hs_issuer(secret=None, algorithms=("RS256",), public_key_file=ec_pem))
    # A JWKS none of whose keys fits the algorithms started, then refused every token.
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    (tmp_path / "ec.json").write_text(json.dumps({"keys": [{**ec_jwk, "kid": "e1"}]}))
    with pytest.raises(ConfigError, match="none of its keys can verify RS256"):
        authn_with(hs_issuer(secret=None, algorithms=("RS256",), jwks_file=tmp_path / "ec.json"))


def test_a_jwks_whose_keys_are_all_for_algorithms_the_issuer_does_not_list_stops_the_start(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Such a JWKS started, and then its RS512 key verified the issuer's RS256 tokens; that no key verifies
    them is said at the start, as for a JWKS of keys of another type."""
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk_of(rsa_key), "alg": "RS512"}]}))
    with pytest.raises(ConfigError, match="none of its keys can verify RS256"):
        authn_with(hs_issuer(secret=None, algorithms=("RS256",), jwks_file=tmp_path / "jwks.json"))
    for document in ("[]", '{"keys": {}}', '{"keys": [{"kty": "RSA", "alg": ["RS256"]}]}'):
        (tmp_path / "jwks.json").write_text(document)  # each a ConfigError, not a traceback
        with pytest.raises(ConfigError, match="not a usable JWKS"):
            authn_with(hs_issuer(secret=None, algorithms=("RS256",), jwks_file=tmp_path / "jwks.json"))


def test_a_jwks_entry_pyjwt_cannot_build_a_key_from_is_skipped_not_a_traceback(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """A symmetric entry without its `k` (PyJWT answers it with a KeyError) stopped the start with a
    traceback: it is skipped as PyJWT's unreadable keys are, and a JWKS of nothing else is not usable."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "oct"}, {**jwk_of(rsa_key), "kid": "k1"}]}))
    authn = authn_with(hs_issuer(secret=None, algorithms=("RS256",), jwks_file=jwks))
    token = jwt.encode(claims_for(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    assert authn.authenticate(bearer(token)).id == "sso:alice"
    jwks.write_text(json.dumps({"keys": [{"kty": "oct"}]}))
    with pytest.raises(ConfigError, match="not a usable JWKS: PyJWT can read none of its keys"):
        authn_with(hs_issuer(secret=None, algorithms=("RS256",), jwks_file=jwks))


def key_row(name: str, plain: str, settings: str | None = None, revoked: bool = False) -> KeyRow:
    return KeyRow(f"key_{name}", name, plain[:10], hash_key(plain), 1.0, 2.0 if revoked else None, settings)


def test_gateway_static_and_internal_keys_carry_claims() -> None:
    callers = CallersConfig(
        internal_keys=(
            {"name": "billing", "key": "internal-0123456789", "claims": {"budget_usd": 1}},
            {"name": "bob-max", "key": "sk-ant-oat01-0123456789", "kind": "subscription_bearer"},
        )
    )
    static = StaticKey(name="ci", key="static-0123456789", claims={"models": ["claude-haiku-*"]})
    authn = Authenticator(callers, [static])
    authn.load(
        [
            key_row("alice", "pg-alice-0123456789", '{"quotas": ["requests=5/min"]}'),
            key_row("carol", "pg-carol-0123456789"),
            key_row("old", "pg-old-0123456789", revoked=True),
            key_row("broken", "pg-broken-0123456789", '{"quotas": ["requests=5/fortnight"]}'),
        ],
        [("ci", "static-0123456789")],
    )

    def who(key: str) -> tuple[str, str, CallerClaims]:
        principal = authn.authenticate({b"x-api-key": key.encode()})
        return principal.id, principal.kind, principal.claims

    assert who("pg-alice-0123456789") == (
        "key_alice",
        "api_key",
        CallerClaims(quotas=(QuotaRule("requests", 5, "minute"),)),
    )
    assert who("pg-carol-0123456789") == ("key_carol", "api_key", NO_CLAIMS)
    assert who("static-0123456789") == ("static:ci", "api_key", CallerClaims(models=("claude-haiku-*",)))
    assert who("internal-0123456789") == ("internal:billing", "internal_key", CallerClaims(budget_micro_usd=1_000_000))
    assert who("sk-ant-oat01-0123456789")[:2] == ("bearer:bob-max", "subscription_bearer")
    # StaticKey objects work in load() too.
    authn.load([], [static])
    assert who("static-0123456789")[2].models == ("claude-haiku-*",)


def test_every_kind_of_caller_credential_is_told_from_a_model_id() -> None:
    """What a model id pasted from the wrong variable is checked against: every key the gateway knows, whatever
    its shape and state, and any token; model ids, Claude's or an alias, are none."""
    callers = CallersConfig(internal_keys=({"name": "billing", "key": "internal-0123456789"},))
    authn = Authenticator(callers, [StaticKey(name="ci", key="static-0123456789")])
    authn.load(
        [
            key_row("alice", "pg-alice-0123456789"),
            key_row("old", "pg-old-0123456789", revoked=True),
            key_row("broken", "pg-broken-0123456789", '{"quotas": ["requests=5/fortnight"]}'),
        ],
        [("ci", "static-0123456789")],
    )
    for credential in (
        "pg-alice-0123456789",
        "pg-old-0123456789",
        "pg-broken-0123456789",
        "static-0123456789",
        "internal-0123456789",
        jwt.encode(claims_for(), SECRET),
    ):
        assert authn.is_caller_credential(credential), credential
    for model in ("claude-sonnet-4-5", "sonnet", "pg-nobody-0123456789", "eyJ-not-a-token"):
        assert not authn.is_caller_credential(model), model


def test_a_configured_key_that_looks_like_a_jwt_works_next_to_a_jwt_issuer() -> None:
    """A Kubernetes service-account token as a static or internal key (`eyJ…`, two dots) went to JWT
    verification once any issuer was configured, and was refused as malformed on every request."""
    static_key, internal_key = "eyJhbGciOiJub25lIn0.c3RhdGlj.c2ln", "eyJraWQiOiJrOHMifQ.aW50ZXJuYWw.c2ln"
    callers = CallersConfig(jwt_issuers=(hs_issuer(),), internal_keys=({"name": "svc", "key": internal_key},))
    authn = Authenticator(callers, [StaticKey(name="k8s", key=static_key)])
    authn.load([], [StaticKey(name="k8s", key=static_key)])
    assert authn.authenticate(bearer(static_key)).id == "static:k8s"
    assert authn.authenticate(bearer(internal_key)).id == "internal:svc"
    assert "malformed" in refused(authn, "eyJhbGciOiJub25lIn0.b3RoZXI.c2ln")  # any other such token is verified


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ([], "Missing gateway key"),
        ([(b"x-api-key", b"pg-nobody-0123456789")], "unknown"),
        ([(b"authorization", b"Bearer pg-old-0123456789")], "revoked"),
        ([(b"x-api-key", b"pg-broken-0123456789")], "unusable"),
        ([(b"x-api-key", jwt.encode(claims_for(), SECRET).encode())], "unknown"),  # no issuers configured
    ],
)
def test_key_refusals_say_why_without_the_key(headers: list[tuple[bytes, bytes]], says: str) -> None:
    authn = Authenticator()
    authn.load([key_row("old", "pg-old-0123456789", revoked=True), key_row("broken", "pg-broken-0123456789", "[1]")])
    with pytest.raises(ApiError) as error:
        authn.authenticate(dict(headers))
    assert error.value.status == 401 and says in error.value.message
    for _, value in headers:
        assert value.decode().removeprefix("Bearer ") not in error.value.message


def test_jwt_shape_detection() -> None:
    assert looks_like_jwt(jwt.encode(claims_for(), SECRET))
    assert not looks_like_jwt("pg-" + "a" * 40)
    assert not looks_like_jwt("eyJ.only-one-dot")


def test_a_key_accepted_before_is_refused_once_revoked_and_sees_new_claims() -> None:
    """Accepted keys are remembered between requests; a reload (revocation, new claims) must not be outlived."""
    authn = Authenticator()
    authn.load([key_row("alice", "pg-alice-0123456789")])
    headers = {b"x-api-key": b"pg-alice-0123456789"}
    assert authn.authenticate(headers).claims == NO_CLAIMS
    assert authn.authenticate(headers).id == "key_alice"  # the remembered answer
    authn.load([key_row("alice", "pg-alice-0123456789", '{"quotas": ["requests=5/min"]}')])
    assert authn.authenticate(headers).claims == CallerClaims(quotas=(QuotaRule("requests", 5, "minute"),))
    authn.load([key_row("alice", "pg-alice-0123456789", revoked=True)])
    with pytest.raises(ApiError) as error:
        authn.authenticate(headers)
    assert error.value.status == 401 and "revoked" in error.value.message


def test_a_reload_during_a_lookup_does_not_leave_the_old_key_remembered() -> None:
    """Reloads build the next key table on another thread: a lookup that began before one must not remember
    what it found in the table that replaced it (the revoked key would then be accepted until the next change)."""
    authn = Authenticator()
    authn.load([key_row("alice", "pg-alice-0123456789")])
    headers = {b"x-api-key": b"pg-alice-0123456789"}

    class ReloadDuringLookup(dict[str, Principal]):
        def get(self, digest: str, default: Principal | None = None) -> Principal | None:  # type: ignore[override]
            found = super().get(digest, default)
            authn.load([key_row("alice", "pg-alice-0123456789", revoked=True)])  # the reload thread's turn
            return found

    authn._keys.principals = ReloadDuringLookup(authn._keys.principals)
    assert authn.authenticate(headers).id == "key_alice"  # the request in flight as the key was revoked
    with pytest.raises(ApiError) as error:
        authn.authenticate(headers)
    assert error.value.status == 401 and "revoked" in error.value.message
