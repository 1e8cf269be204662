"""Ballots only in one's own name: voters proven by signed tokens.

With VOTEFLOW_VOTER_TOKEN_SECRET or VOTEFLOW_VOTER_TOKEN_PUBLIC_KEY set, a
user id is only ever what a valid token's `sub` says; everything else is a
401 (no or a bad token) or a 403 (someone else's user id), and changes
nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ingest.voters import VoterTokens
from tests.support import ADMIN, InProcessWorker, backlog, ballot, create_poll, drain, edge_client
from voteflow.settings import Settings, SettingsError

Client = TestClient[Any, Any]
SECRET = "a-voter-token-secret-of-32-bytes-at-least"


def token(sub: str = "alice", key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    payload = {"sub": sub, "exp": int(time.time()) + 600, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with edge_client(replace(settings, voter_token_secret=SECRET)) as running:
        yield running


async def voters_of(settings: Settings, poll_id: str) -> list[str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT voter FROM votes WHERE poll_id = $1 ORDER BY received_at", poll_id
        )
    finally:
        await conn.close()
    return [row["voter"] for row in rows]


async def test_a_token_names_the_voter_and_a_body_user_id_must_be_its_own(
    client: Client, settings: Settings, redis_client: aioredis.Redis
) -> None:
    poll = await create_poll(client, allow_multiple_votes=True)
    vote = {"poll_id": poll["id"], "option_ids": [poll["options"][0]["id"]]}
    assert (await client.post("/api/vote", json=vote, headers=bearer(token()))).status == 202
    own = {**vote, "user_id": "alice"}
    assert (await client.post("/api/vote", json=own, headers=bearer(token()))).status == 202
    # Alice's token, Bob's name: refused, nothing queued.
    before = await backlog(redis_client, settings)
    response = await client.post(
        "/api/vote", json={**vote, "user_id": "bob"}, headers=bearer(token())
    )
    assert response.status == 403
    assert (await response.json())["field"] == "user_id"
    assert await backlog(redis_client, settings) == before
    async with InProcessWorker(settings):
        await drain(redis_client, settings)
    assert await voters_of(settings, poll["id"]) == ["u:alice", "u:alice"]


async def test_a_user_id_with_no_token_is_refused_401(
    client: Client, settings: Settings, redis_client: aioredis.Redis
) -> None:
    """The attack the tokens stop: voting, or replacing a ballot, as alice
    from anywhere by naming her."""
    poll = await create_poll(client)
    body = {"poll_id": poll["id"], "option_ids": [poll["options"][0]["id"]], "user_id": "alice"}
    response = await client.post("/api/vote", json=body)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await response.json())["field"] == "user_id"
    assert await backlog(redis_client, settings) == 0
    # Fingerprint ballots (anonymous polls) still need no token.
    assert (await client.post("/api/vote", json=ballot(poll, "anon"))).status == 202


def _tampered(value: str) -> str:
    header, _payload, signature = value.split(".")
    forged = jwt.utils.base64url_encode(b'{"sub":"mallory","exp":9999999999}').decode()
    return ".".join((header, forged, signature))


BAD_TOKENS = {
    "expired": lambda: token(exp=int(time.time()) - 60),
    "not yet valid": lambda: token(nbf=int(time.time()) + 600),
    "tampered": lambda: _tampered(token()),
    "signed with another secret": lambda: token(key="another-secret-of-at-least-32-bytes!!"),
    "alg none": lambda: jwt.encode({"sub": "alice", "exp": 9999999999}, None, "none"),
    "no exp": lambda: token(exp=None),
    "no sub": lambda: token(sub=None),  # type: ignore[arg-type]
    "not a JWT": lambda: "not-a-jwt",
    "HS384": lambda: token(key=SECRET * 2, algorithm="HS384"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_a_bad_token_is_refused_401_and_queues_nothing(
    client: Client, settings: Settings, redis_client: aioredis.Redis, kind: str
) -> None:
    poll = await create_poll(client)
    body = {"poll_id": poll["id"], "option_ids": [poll["options"][0]["id"]]}
    response = await client.post("/api/vote", json=body, headers=bearer(BAD_TOKENS[kind]()))
    assert response.status == 401, await response.text()
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer") and 'error="invalid_token"' in challenge
    assert "voter token" in (await response.json())["error"]
    assert await backlog(redis_client, settings) == 0


async def test_a_cached_token_is_refused_once_it_expires(settings: Settings) -> None:
    async with edge_client(replace(settings, voter_token_secret=SECRET)) as client:
        poll = await create_poll(client, allow_multiple_votes=True)
        body = {"poll_id": poll["id"], "option_ids": [poll["options"][0]["id"]]}
        short = token(exp=int(time.time()) + 2)
        assert (await client.post("/api/vote", json=body, headers=bearer(short))).status == 202
        await asyncio.sleep(max(jwt.decode(short, SECRET, ["HS256"])["exp"] - time.time(), 0) + 1)
        assert (await client.post("/api/vote", json=body, headers=bearer(short))).status == 401


async def test_issuer_and_audience_are_checked_when_set(settings: Settings) -> None:
    settings = replace(
        settings,
        voter_token_secret=SECRET,
        voter_token_issuer="https://app.example",
        voter_token_audience="voteflow",
    )
    async with edge_client(settings) as client:
        poll = await create_poll(client, allow_multiple_votes=True)
        body = {"poll_id": poll["id"], "option_ids": [poll["options"][0]["id"]]}
        good = token(iss="https://app.example", aud="voteflow")
        assert (await client.post("/api/vote", json=body, headers=bearer(good))).status == 202
        for wrong in (
            token(iss="https://evil.example", aud="voteflow"),
            token(iss="https://app.example", aud="another-service"),
            token(),
        ):
            assert (await client.post("/api/vote", json=body, headers=bearer(wrong))).status == 401


def _keypair(kind: str) -> tuple[Any, str, str]:
    """A private key, its public key in PEM, and the JWS algorithm."""
    private: Any
    if kind == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, pem.decode(), kind


def _hs256_signed_with(key: bytes) -> str:
    """A token an attacker makes by using the public key as an HS256 secret
    (PyJWT itself refuses to, so by hand)."""
    encode = jwt.utils.base64url_encode
    signed = b".".join(
        (encode(b'{"alg":"HS256","typ":"JWT"}'), encode(b'{"sub":"mallory","exp":9999999999}'))
    )
    return (signed + b"." + encode(hmac.new(key, signed, hashlib.sha256).digest())).decode()


@pytest.mark.parametrize("kind", ["RS256", "ES256", "EdDSA"])
async def test_a_public_key_verifies_its_own_signatures_only(
    settings: Settings, kind: str, tmp_path: Any
) -> None:
    private, pem, algorithm = _keypair(kind)
    # The key as a file's path, as a mounted Kubernetes secret gives it.
    (tmp_path / "voter.pem").write_text(pem)
    settings = replace(settings, voter_token_public_key=str(tmp_path / "voter.pem"))
    async with edge_client(settings) as client:
        poll = await create_poll(client, allow_multiple_votes=True)
        body = {"poll_id": poll["id"], "option_ids": [poll["options"][0]["id"]]}
        good = token(key=private, algorithm=algorithm)
        assert (await client.post("/api/vote", json=body, headers=bearer(good))).status == 202
        other, _, _ = _keypair(kind)
        forged = token(key=other, algorithm=algorithm)
        assert (await client.post("/api/vote", json=body, headers=bearer(forged))).status == 401
        # The public key used as an HMAC secret (algorithm confusion): refused.
        confused = _hs256_signed_with(pem.encode())
        assert (await client.post("/api/vote", json=body, headers=bearer(confused))).status == 401


async def test_a_poll_requiring_tokens_refuses_fingerprint_ballots(
    client: Client, settings: Settings, redis_client: aioredis.Redis
) -> None:
    poll = await create_poll(client, require_voter_token=True)
    assert poll["require_voter_token"] is True
    fetched = await (await client.get(f"/api/polls/{poll['id']}")).json()
    assert fetched["require_voter_token"] is True
    response = await client.post("/api/vote", json=ballot(poll, "anon"))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await backlog(redis_client, settings) == 0
    body = {"poll_id": poll["id"], "option_ids": [poll["options"][0]["id"]]}
    assert (await client.post("/api/vote", json=body, headers=bearer(token()))).status == 202
    open_polls = await (await client.get("/api/polls")).json()
    assert [p["require_voter_token"] for p in open_polls["polls"]] == [True]


async def test_requiring_tokens_on_an_edge_that_verifies_none_is_422(edge: Client) -> None:
    body = {"question": "Q?", "options": ["a", "b"], "require_voter_token": True}
    response = await edge.post("/api/polls", json=body, headers=ADMIN)
    assert response.status == 422
    assert (await response.json())["field"] == "require_voter_token"


def test_settings_that_cannot_verify_stop_the_start(tmp_path: Any) -> None:
    _, pem, _ = _keypair("RS256")
    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    cases = {
        "not both": Settings(voter_token_secret=SECRET, voter_token_public_key=pem),
        "at least 32 bytes": Settings(voter_token_secret="short"),
        "not a PEM public key": Settings(voter_token_public_key="-----BEGIN PUBLIC KEY-----\nx"),
        "could not read": Settings(voter_token_public_key=str(tmp_path / "missing.pem")),
        "P-256": Settings(voter_token_public_key=p384.decode()),
    }
    for expected, settings in cases.items():
        with pytest.raises(SettingsError, match=expected):
            VoterTokens.from_settings(settings)
    assert VoterTokens.from_settings(Settings()) is None


def test_the_secret_is_never_in_the_settings_repr() -> None:
    assert SECRET not in repr(Settings(voter_token_secret=SECRET))
