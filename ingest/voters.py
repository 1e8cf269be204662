"""Who a voter is, proven: signed voter tokens (JWT) issued by the app whose
users vote.

With ``VOTEFLOW_VOTER_TOKEN_SECRET`` (HS256, a secret shared with the app) or
``VOTEFLOW_VOTER_TOKEN_PUBLIC_KEY`` (the app's public key, PEM: RS256, ES256
or EdDSA, by the key's type) set, a ballot may carry ``Authorization: Bearer
<token>``; the token's ``sub`` is then the voter's user id. PyJWT verifies
the signature, ``exp`` (required), ``nbf``, and the issuer and audience when
they are set; exactly one algorithm is accepted (so never ``none``, and never
an HMAC made with the public key). The rules of who may vote as whom are in
ingest.validate.voter_of.

A verified token is kept, by its text, until its ``exp`` (a bounded LRU): a
voter's later ballots and a client's retries cost a dictionary lookup, not a
signature check. Only verified tokens are kept; a forged one costs a check
every time, as it should.
"""

from __future__ import annotations

import time
from pathlib import Path

import jwt
from cachetools import TLRUCache
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from voteflow.settings import Settings, SettingsError

from .contract import MAX_VOTER_ID

# Verified tokens kept per edge process (about 300 bytes each with its text).
CACHE_SIZE = 100_000
# Characters of a token this edge looks at: far more than any real one.
MAX_TOKEN = 8192
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash.
MIN_SECRET = 32


class TokenError(Exception):
    """A voter token that does not prove who the voter is; answered 401."""


# A verified token's (sub, exp): a plain tuple of atoms, which the garbage
# collector stops tracking, so a full cache costs its collections nothing.
_Verified = tuple[str, float]


def _algorithm(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name != "secp256r1":
            raise SettingsError(
                f"VOTEFLOW_VOTER_TOKEN_PUBLIC_KEY is an EC key on {key.curve.name}; "
                "ES256 needs P-256 (secp256r1)"
            )
        return "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "EdDSA"
    raise SettingsError(
        "VOTEFLOW_VOTER_TOKEN_PUBLIC_KEY must be an RSA, P-256 or Ed25519 public key (PEM)"
    )


def _public_key(value: str) -> bytes:
    """The PEM itself, or the path of a file holding it (a mounted secret)."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise SettingsError(
            "VOTEFLOW_VOTER_TOKEN_PUBLIC_KEY must be a PEM public key or the path of a file "
            f"holding one; could not read {value!r}: {exc.strerror}"
        ) from None


class VoterTokens:
    def __init__(self, key: object, algorithm: str, issuer: str = "", audience: str = "") -> None:
        self._key = key
        self._algorithms = [algorithm]
        self._issuer = issuer or None
        self._audience = audience or None
        self._verified: TLRUCache[str, _Verified] = TLRUCache(
            maxsize=CACHE_SIZE, ttu=lambda _token, verified, _now: verified[1], timer=time.time
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> VoterTokens | None:
        """The verifier the settings ask for, or None when voters are not
        proven (then a ballot's user_id is taken on the client's word)."""
        secret, public = settings.voter_token_secret, settings.voter_token_public_key
        if secret and public:
            raise SettingsError(
                "set VOTEFLOW_VOTER_TOKEN_SECRET or VOTEFLOW_VOTER_TOKEN_PUBLIC_KEY, not both"
            )
        if secret:
            if len(secret.encode()) < MIN_SECRET:
                raise SettingsError(
                    f"VOTEFLOW_VOTER_TOKEN_SECRET must be at least {MIN_SECRET} bytes (HS256)"
                )
            key: object = secret.encode()
            algorithm = "HS256"
        elif public:
            try:
                key = load_pem_public_key(_public_key(public))
            except ValueError as exc:
                raise SettingsError(
                    f"VOTEFLOW_VOTER_TOKEN_PUBLIC_KEY is not a PEM public key: {exc}"
                ) from None
            algorithm = _algorithm(key)
        else:
            return None
        return cls(key, algorithm, settings.voter_token_issuer, settings.voter_token_audience)

    def verify(self, token: str) -> str:
        """The voter's user id (the token's ``sub``); :class:`TokenError` if
        the token proves nothing."""
        found = self._verified.get(token)
        if found is not None:
            return found[0]
        if len(token) > MAX_TOKEN:
            raise TokenError("the voter token is too long")
        try:
            claims = jwt.decode(
                token,
                self._key,  # type: ignore[arg-type]
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["sub", "exp"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the voter token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("the voter token is not valid yet") from None
        except jwt.InvalidIssuerError:
            raise TokenError("the voter token is from another issuer") from None
        except jwt.InvalidAudienceError:
            raise TokenError("the voter token is for another audience") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("the voter token is not signed with the expected algorithm") from None
        except jwt.InvalidSignatureError:
            raise TokenError("the voter token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"the voter token has no {exc.claim!r} claim") from None
        except jwt.InvalidTokenError:
            raise TokenError("the voter token is not a valid JWT") from None
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > MAX_VOTER_ID or "\x00" in sub:
            raise TokenError(
                f"the voter token's sub must be a user id of 1 to {MAX_VOTER_ID} characters"
            )
        self._verified[token] = (sub, float(claims["exp"]))
        return sub
