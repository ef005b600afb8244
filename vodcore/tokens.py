"""Playback tokens: EdDSA (Ed25519) JWTs minted by control, checked by edges.

Rules (pure; `now` is always passed in):
- the header must say alg EdDSA and name a kid the verifier holds; anything else (alg none,
  HS256 with the public key as a secret, unknown kid) is refused before any signature check;
- claims `vid` (video id), `iat`, `exp` are required; `vid` must equal the video in the path;
- a token is valid while iat - LEEWAY <= now < exp.

Control keeps private keys under DATA/keys/{kid}.pem and publishes the public half as a JWKS;
edges hold only public keys, so an edge cannot mint tokens.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG = "EdDSA"
LEEWAY_SECONDS = 30


class TokenError(ValueError):
    """The token is not acceptable; the message says why (for logs, not for clients)."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    video_id: str
    issued_at: int
    expires_at: int
    kid: str
    session_id: str | None = None


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(kid: str, key: Ed25519PublicKey) -> dict[str, str]:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64u(raw), "kid": kid, "alg": ALG, "use": "sig"}


def keys_from_jwks(doc: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
    out: dict[str, Ed25519PublicKey] = {}
    for jwk in doc.get("keys", []):
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or "kid" not in jwk:
            continue
        key = jwt.PyJWK(jwk, algorithm=ALG).key
        if isinstance(key, Ed25519PublicKey):
            out[str(jwk["kid"])] = key
    return out


class SigningKeys:
    """Control's private keys on disk; the newest signs, all are published."""

    def __init__(self, keys_dir: Path) -> None:
        self.dir = Path(keys_dir)
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.current_kid = ""

    def load_or_create(self) -> SigningKeys:
        self.dir.mkdir(parents=True, exist_ok=True)
        pems = sorted(self.dir.glob("*.pem"), key=lambda p: p.stat().st_mtime)
        if not pems:
            self.rotate()
            return self
        for p in pems:
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
            if isinstance(key, Ed25519PrivateKey):
                self.keys[p.stem] = key
                self.current_kid = p.stem
        return self

    def rotate(self) -> str:
        kid = "k" + secrets.token_hex(4)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self.dir / f"{kid}.pem"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pem)
        tmp.chmod(0o600)
        tmp.replace(path)
        self.keys[kid] = key
        self.current_kid = kid
        return kid

    def revoke(self, kid: str) -> None:
        """Stop publishing (and signing with) `kid`; its tokens fail at every edge once the
        edges refetch the key set. The key file moves to revoked/ (kept for the record).
        Revoking the signing key first rotates to a new one, so signing never stops."""
        if kid not in self.keys:
            raise KeyError(kid)
        if kid == self.current_kid:
            self.rotate()
        revoked = self.dir / "revoked"
        revoked.mkdir(exist_ok=True)
        (self.dir / f"{kid}.pem").replace(revoked / f"{kid}.pem")
        del self.keys[kid]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(k, v.public_key()) for k, v in self.keys.items()]}

    def mint(self, video_id: str, now: int, ttl_seconds: int, session_id: str | None = None) -> str:
        claims: dict[str, Any] = {"vid": video_id, "iat": now, "exp": now + ttl_seconds}
        if session_id:
            claims["sid"] = session_id
        key = self.keys[self.current_kid]
        return jwt.encode(claims, key, algorithm=ALG, headers={"kid": self.current_kid})


def verify(token: str, keys: dict[str, Ed25519PublicKey], video_id: str, now: int) -> TokenClaims:
    """Check a token against public keys for one video at time `now`."""
    if not token or len(token) > 4096 or token.count(".") != 2:
        raise TokenError("malformed token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise TokenError(f"bad header: {e}") from None
    if header.get("alg") != ALG:
        raise TokenError("algorithm not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise TokenError("unknown kid")
    try:
        claims = jwt.decode(
            token,
            keys[kid],
            algorithms=[ALG],
            options={
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "require": ["vid", "iat", "exp"],
            },
        )
    except jwt.PyJWTError as e:
        raise TokenError(f"bad token: {e}") from None
    vid, iat, exp = claims.get("vid"), claims.get("iat"), claims.get("exp")
    if type(iat) is not int or type(exp) is not int or not isinstance(vid, str):
        raise TokenError("bad claim types")
    if vid != video_id:
        raise TokenError("token is for another video")
    if now >= exp:
        raise TokenError("expired")
    if iat - LEEWAY_SECONDS > now:
        raise TokenError("issued in the future")
    sid = claims.get("sid")
    return TokenClaims(vid, iat, exp, kid, sid if isinstance(sid, str) else None)
