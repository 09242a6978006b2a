"""Webhook signatures (appliance/control/notify/signing.py): what a receiver checks."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from appliance.control.notify.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
    verify,
)

SECRET = b"s3cret-shared-with-the-receiver"
BODY = b'{"event":"test","id":"1"}'
NOW = 1_800_000_000.0


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    headers = sign(SECRET, BODY, now=NOW)
    assert headers[TIMESTAMP_HEADER] == "1800000000"
    expected = hmac.new(SECRET, b"1800000000." + BODY, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == f"sha256={expected}"
    assert verify(SECRET, headers[TIMESTAMP_HEADER], BODY, headers[SIGNATURE_HEADER], now=NOW)


def test_tampered_body_wrong_secret_and_moved_timestamp_are_refused() -> None:
    h = sign(SECRET, BODY, now=NOW)
    ts, sig = h[TIMESTAMP_HEADER], h[SIGNATURE_HEADER]
    assert not verify(SECRET, ts, BODY.replace(b"test", b"tesT"), sig, now=NOW)
    assert not verify(b"another secret", ts, BODY, sig, now=NOW)
    assert not verify(SECRET, str(int(ts) + 1), BODY, sig, now=NOW)


def test_old_or_future_timestamp_is_refused_even_when_signed() -> None:
    old = sign(SECRET, BODY, now=NOW - 301)
    assert not verify(SECRET, old[TIMESTAMP_HEADER], BODY, old[SIGNATURE_HEADER], now=NOW)
    future = sign(SECRET, BODY, now=NOW + 301)
    assert not verify(SECRET, future[TIMESTAMP_HEADER], BODY, future[SIGNATURE_HEADER], now=NOW)
    recent = sign(SECRET, BODY, now=NOW - 299)
    assert verify(SECRET, recent[TIMESTAMP_HEADER], BODY, recent[SIGNATURE_HEADER], now=NOW)
    assert verify(
        SECRET, old[TIMESTAMP_HEADER], BODY, old[SIGNATURE_HEADER], tolerance_s=400, now=NOW
    )


@pytest.mark.parametrize(
    ("timestamp", "signature"),
    [
        ("", "sha256=00"),
        ("-5", "sha256=00"),
        ("1e9", "sha256=00"),
        ("١٨٠٠٠٠٠٠٠٠", "sha256=00"),  # Arabic-Indic digits: isdigit() but not ASCII
        ("9" * 400, "sha256=00"),
        ("1800000000", "sha256=ÿ" * 10),
        ("1800000000", ""),
    ],
)
def test_hostile_headers_are_refused_without_raising(timestamp: str, signature: str) -> None:
    assert verify(SECRET, timestamp, BODY, signature, now=NOW) is False
