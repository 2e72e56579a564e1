"""The cryptography of secure aggregation, all from the `cryptography` package.

- key agreement: X25519, each shared secret stretched by HKDF-SHA256 with a label naming its use
  and the round, so a key never serves two purposes or two rounds;
- the pairwise channel for shares (relayed by the server): ChaCha20-Poly1305, a fresh random
  nonce per message, the associated data naming round, sender and recipient (a share relayed as
  another client's, or into another round, fails to open);
- the mask generator: the ChaCha20 keystream under a 32-byte seed, read as little-endian uint32
  words. A cryptographic generator: masks cannot be predicted from each other or from the seed's
  neighbours, unlike a statistical RNG seeded with a 32-bit fold of the key.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_RAW = serialization.Encoding.Raw


class CryptoError(ValueError):
    """A key or a sealed message that is not valid; the reason is safe to log."""


def new_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_from_bytes(data: bytes) -> X25519PrivateKey:
    if len(data) != KEY_BYTES:
        raise CryptoError(f"a private key is {KEY_BYTES} bytes, got {len(data)}")
    return X25519PrivateKey.from_private_bytes(data)


# The X25519 public keys of small order, bit 255 ignored as X25519 ignores it (libsodium's list):
# 0, 1, the two points of order 8, p - 1, p and p + 1 (p = 2^255 - 19). Any private key agrees
# with one of these on the all-zero secret.
_SMALL_ORDER = frozenset(
    bytes.fromhex(h)
    for h in (
        "00" * 32,
        "01" + "00" * 31,
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ec" + "ff" * 30 + "7f",
        "ed" + "ff" * 30 + "7f",
        "ee" + "ff" * 30 + "7f",
    )
)


def small_order(public: bytes) -> bool:
    """Whether `public` is a key of small order (agreeing with it gives the all-zero secret)."""
    return public[:31] + bytes([public[31] & 0x7F]) in _SMALL_ORDER if len(public) == KEY_BYTES else False


def agree(key: X25519PrivateKey, peer_public: bytes, label: bytes) -> bytes:
    """The 32-byte key `key` shares with the owner of `peer_public`, for the use `label` names."""
    if len(peer_public) != KEY_BYTES:
        raise CryptoError(f"a public key is {KEY_BYTES} bytes, got {len(peer_public)}")
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise CryptoError("a public key of low order") from None
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=b"fedforge secagg " + label).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError("a sealed message too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise CryptoError("a sealed message that does not open (forged, altered or misaddressed)") from None


def expand(seed: bytes, count: int) -> np.ndarray:
    """`count` uint32 words of the ChaCha20 keystream under `seed` (a mask): the same for the same
    seed, unpredictable without it."""
    if len(seed) != KEY_BYTES:
        raise CryptoError(f"a mask seed is {KEY_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * count)), dtype="<u4").astype(np.uint32, copy=False)


def commitment(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed `parts`: binds a dealer to a share or a seed it reveals later."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.digest()
