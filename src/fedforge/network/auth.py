"""Client authentication: one secret per client id, the server keeping only its SHA-256."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from .._io import atomic_write
from ..errors import ConfigError


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def load_tokens(path: str | os.PathLike) -> dict[int, str]:
    """The server's token file: client id -> SHA-256 of its secret."""
    try:
        data = json.loads(Path(path).read_text())
        return {int(k): str(v["sha256"]) for k, v in data["clients"].items()}
    except FileNotFoundError:
        raise ConfigError(f"token file {path} not found (create it with fedforge enroll)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"token file {path} is malformed ({type(e).__name__}: {e})") from None


def enroll(tokens_path: str | os.PathLike, client_id: int) -> str:
    """Issue a new secret for `client_id` (replacing any old one); returns the secret."""
    tokens = load_tokens(tokens_path) if Path(tokens_path).exists() else {}
    secret = secrets.token_urlsafe(32)
    tokens[client_id] = _digest(secret)
    with atomic_write(tokens_path) as f:
        os.chmod(f.name, 0o600)
        json.dump({"clients": {str(k): {"sha256": v} for k, v in sorted(tokens.items())}}, f, indent=2)
    return secret


def write_secret(path: str | os.PathLike, secret: str) -> None:
    with atomic_write(path) as f:
        os.chmod(f.name, 0o600)
        f.write(secret + "\n")


def read_secret(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"token file {path} not found") from None


def verify(tokens: dict[int, str], client_id: int, secret: str) -> str | None:
    """None when `secret` is `client_id`'s, else the reason to refuse (safe to log)."""
    expected = tokens.get(client_id)
    if expected is None:
        return f"unknown client id {client_id}"
    if not hmac.compare_digest(_digest(secret), expected):
        return f"wrong secret for client {client_id}"
    return None
