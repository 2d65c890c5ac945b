"""AES-256-GCM for provider keys at rest (bring your own key).

The key comes from ``ENCRYPTION_KEY`` (config ``security.encryption_key``): 32 bytes
as base64 (``openssl rand -base64 32``) or 64 hex digits. Keys being retired go in
``ENCRYPTION_KEY_PREVIOUS`` (``security.previous_encryption_keys``), comma-separated:
they still decrypt, but nothing is encrypted under them.

A ciphertext is ``v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>``. The key id
is the first 8 bytes (hex) of SHA-256("aiproxy-key-id" ‖ key): enough to pick the
key to decrypt with, useless for recovering it. The nonce is 96 random bits, new for
every encryption. The associated data binds the ciphertext to its row (tenant and
provider), so a ciphertext copied to another tenant's row fails to decrypt.

Rotation without downtime: (1) give every replica the new ``ENCRYPTION_KEY`` and the
old one in ``ENCRYPTION_KEY_PREVIOUS`` (both decrypt; new writes use the new one);
(2) ``aiproxy db rotate-encryption-key`` re-encrypts every row under the new key;
(3) drop ``ENCRYPTION_KEY_PREVIOUS``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = "v1"
KEY_ENV = "ENCRYPTION_KEY"
PREVIOUS_ENV = "ENCRYPTION_KEY_PREVIOUS"


class CryptoError(Exception):
    """A key that is malformed, missing, or does not open a ciphertext; never holds a secret."""


def parse_key(value: str, what: str = KEY_ENV) -> bytes:
    """32 bytes from base64 (standard or URL-safe) or 64 hex digits."""
    text = value.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text)
                               else None, validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError(f"{what} is neither base64 nor hex; "
                          "make one with 'openssl rand -base64 32'") from None
    if len(raw) != 32:
        raise CryptoError(f"{what} must be 32 bytes (AES-256), got {len(raw)}; "
                          "make one with 'openssl rand -base64 32'")
    return raw


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"aiproxy-key-id" + key).hexdigest()[:16]


class Cipher:
    """Encrypts under the current key; decrypts under the current or any previous one."""

    def __init__(self, current: bytes, previous: Iterable[bytes] = ()) -> None:
        self.current_id = key_id(current)
        self._current = AESGCM(current)
        self._keys = {self.current_id: self._current}
        for key in previous:
            self._keys.setdefault(key_id(key), AESGCM(key))

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def encrypt(self, plaintext: str, aad: bytes) -> str:
        nonce = os.urandom(12)
        sealed = self._current.encrypt(nonce, plaintext.encode(), aad)
        return f"{VERSION}:{self.current_id}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def decrypt(self, token: str, aad: bytes) -> str:
        version, kid, blob = _split(token)
        if version != VERSION:
            raise CryptoError(f"unknown ciphertext version {version!r}")
        aes = self._keys.get(kid)
        if aes is None:
            raise CryptoError(f"encrypted under key {kid}, which is neither {KEY_ENV} nor in "
                              f"{PREVIOUS_ENV}")
        try:
            raw = base64.urlsafe_b64decode(blob)
            return aes.decrypt(raw[:12], raw[12:], aad).decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise CryptoError("the ciphertext does not open: "
                              "it was altered, or belongs to another row") from None

    def key_of(self, token: str) -> str:
        """The key id a ciphertext was made with."""
        return _split(token)[1]


def _split(token: str) -> tuple[str, str, str]:
    parts = token.split(":", 2)
    if len(parts) != 3:
        raise CryptoError("not an aiproxy ciphertext")
    return parts[0], parts[1], parts[2]


def cipher_from(settings: Mapping[str, object]) -> Cipher | None:
    """The cipher for a ``security:`` section (``encryption_key``, ``previous_encryption_keys``:
    a list or a comma-separated string), or None when no key is set (then provider keys
    cannot be stored). The shipped config reads both from the environment."""
    current = str(settings.get("encryption_key") or "").strip()
    previous = settings.get("previous_encryption_keys") or ""
    items = previous if isinstance(previous, list) else str(previous).split(",")
    if not current:
        if any(str(p).strip() for p in items):
            raise CryptoError(f"security.previous_encryption_keys ({PREVIOUS_ENV}) is set but "
                              f"security.encryption_key ({KEY_ENV}) is not")
        return None
    old = [parse_key(str(p), f"{PREVIOUS_ENV}[{i}]") for i, p in enumerate(items) if str(p).strip()]
    return Cipher(parse_key(current, f"security.encryption_key ({KEY_ENV})"), old)
