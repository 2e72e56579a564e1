"""Shamir's secret sharing of 32-byte secrets (mask seeds, X25519 private keys).

A secret is the constant term of a random polynomial of degree t - 1 over GF(p), p = 2**521 - 1
(a Mersenne prime, larger than any 32-byte secret); the share of the holder at x (an integer in
[1, p)) is the polynomial's value at x, FIELD_BYTES big-endian bytes. Any t shares give the secret
back by Lagrange interpolation at 0; fewer reveal nothing about it. The coefficients come from
the OS's cryptographic source (`secrets`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

PRIME = (1 << 521) - 1
FIELD_BYTES = 66
SECRET_BYTES = 32


class ShareError(ValueError):
    """Shares that cannot give a secret back (too few, malformed, duplicated)."""


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """The share of `secret` for each holder in `xs`; any `threshold` of them give it back."""
    xs = list(xs)
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ShareError(f"threshold {threshold} must be between 1 and the {len(xs)} holders")
    if len(set(xs)) != len(xs) or not all(type(x) is int and 0 < x < PRIME for x in xs):
        raise ShareError("holders must be distinct integers in [1, p)")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(FIELD_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from `threshold` of `shares` (holder x -> share); ShareError with fewer.

    Exactly `threshold` shares are used (the first, in the mapping's order): the caller checks
    each share before (see protocol.py: every share is committed to by its dealer)."""
    if len(shares) < threshold or threshold < 1:
        raise ShareError(f"{len(shares)} shares, the threshold is {threshold}")
    points = []
    for x, share in list(shares.items())[:threshold]:
        if not (type(x) is int and 0 < x < PRIME) or len(share) != FIELD_BYTES:
            raise ShareError("a share is malformed")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise ShareError("a share is not a field element")
        points.append((x, y))
    if len({x for x, _ in points}) != len(points):
        raise ShareError("two shares of the same holder")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError("the shares do not hold a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
