"""The webhook signature scheme: signed and verified, checked against a plain HMAC, tampered,
stale, future, rotated and malformed headers."""

from __future__ import annotations

import pytest

from core.signing import sign, verify_signature
from tests.support import independent_sign

SECRET = b"whsec-test"
BODY = b'{"order_id":"o-1","amount_cents":2699}'
NOW = 1_700_000_000


@pytest.mark.parametrize(
    ("header", "body", "secret", "expected"),
    [
        (sign(SECRET, BODY, NOW), BODY, SECRET, True),
        (independent_sign(SECRET.decode(), BODY, NOW), BODY, SECRET, True),
        (sign(SECRET, BODY, NOW - 300), BODY, SECRET, True),  # at the edge of the tolerance
        (sign(SECRET, BODY, NOW), BODY.replace(b"2699", b"2700"), SECRET, False),  # tampered
        (sign(SECRET, BODY, NOW), BODY, b"wrong-secret", False),
        (sign(SECRET, BODY, NOW - 301), BODY, SECRET, False),  # stale: a replay
        (sign(SECRET, BODY, NOW + 301), BODY, SECRET, False),  # from the future
        # Rotation: the receiver accepts any v1 that matches.
        (sign(SECRET, BODY, NOW) + ",v1=" + "0" * 64, BODY, SECRET, True),
        (f"t={NOW},v1=" + "0" * 64, BODY, SECRET, False),
        (sign(SECRET, BODY, NOW).split(",")[1], BODY, SECRET, False),  # no timestamp
        (f"t={NOW}", BODY, SECRET, False),  # no signature
        (f"t=soon,v1={sign(SECRET, BODY, NOW).split('v1=')[1]}", BODY, SECRET, False),
        ("garbage", BODY, SECRET, False),
        ("", BODY, SECRET, False),
        (None, BODY, SECRET, False),
    ],
)
def test_verify_signature(header: str | None, body: bytes, secret: bytes, expected: bool) -> None:
    assert verify_signature(secret, header, body, now=NOW) is expected
