"""Signatures on webhook bodies: HMAC-SHA256 over f"{timestamp}.{body}".

    X-Appliance-Timestamp: 1767225600            (unix seconds, when it was sent)
    X-Appliance-Signature: sha256=<hex digest>

A receiver recomputes the digest over the timestamp header, a dot and the raw body bytes with the
shared secret, compares in constant time, and refuses a timestamp too far from its clock (a
replayed old delivery). `verify` below is that check; the README shows it standalone.
"""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Appliance-Timestamp"
SIGNATURE_HEADER = "X-Appliance-Signature"
PREFIX = "sha256="
TOLERANCE_S = 300


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return PREFIX + digest.hexdigest()


def sign(secret: bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    """The two headers for `body`, sent at `now` (default: this instant)."""
    timestamp = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify(
    secret: bytes,
    timestamp: str,
    body: bytes,
    signature_header: str,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when `signature_header` signs (timestamp, body) with `secret` and the timestamp is
    within `tolerance_s` of `now`. A receiver's check; never raises on hostile input."""
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_s:
        return False
    if not signature_header.isascii():
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), signature_header)
