"""Ed25519 detached signatures for curated JSONL files.

The signature covers the file's exact bytes and is stored next to it (`facts.jsonl.sig`) as
base64 text. Public keys are pinned in the policy as `ed25519:<base64 of the 32 raw bytes>`.
Private keys are PKCS#8 PEM files, so OpenSSL can make and use them too:

    openssl genpkey -algorithm ed25519 -out signer.pem
    openssl pkey -in signer.pem -pubout -outform DER | tail -c 32 | base64      # public key
    openssl pkeyutl -sign -inkey signer.pem -rawin -in facts.jsonl | base64 -w0 > facts.jsonl.sig
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["SignatureError", "generate_key", "public_key_text", "sign_file", "verify_detached"]


class SignatureError(Exception):
    """A signature that is missing, malformed or made by no pinned key."""


def generate_key(path: str | Path) -> str:
    """Write a new private key (PEM, mode 0600) to `path`; return the public key text to pin."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrite a key
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return public_key_text(key.public_key())


def public_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def _load_private(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def sign_file(path: str | Path, key_path: str | Path, out: str | Path | None = None) -> Path:
    """Sign a file's bytes; writes `<path>.sig` (or `out`) and returns its path."""
    data = Path(path).read_bytes()
    signature = _load_private(key_path).sign(data)
    out = Path(out) if out else Path(f"{path}.sig")
    out.write_text(base64.b64encode(signature).decode() + "\n")
    return out


def verify_detached(data: bytes, signature_text: bytes | None, keys: Iterable[bytes]) -> int:
    """Check a detached signature; returns the index of the pinned key that made it."""
    if signature_text is None:
        raise SignatureError("no signature file")
    try:
        signature = base64.b64decode(signature_text.strip(), validate=True)
    except ValueError:
        raise SignatureError("signature is not base64") from None
    if len(signature) != 64:
        raise SignatureError(f"an Ed25519 signature is 64 bytes, this one is {len(signature)}")
    for index, raw in enumerate(keys):
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
            return index
        except InvalidSignature:
            continue
    raise SignatureError("signature does not match the file under any pinned key")
