"""The auth callout's own logic (``shared/bus/callout.py``); a real nats-server running the chart's config
with it is in ``tests/test_helm_chart.py``, and a tuning job connecting through it on the node in
``tests/test_helm_install.py``."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.bus import callout

KEY = "tuning-key"


def verified(token: str, key: Ed25519PrivateKey) -> dict[str, object]:
    header, payload, signature = token.split(".")
    key.public_key().verify(base64.urlsafe_b64decode(signature + "=="), f"{header}.{payload}".encode())
    return callout.claims_of(token)


def request(user: str, password: str) -> bytes:
    server = Ed25519PrivateKey.generate()
    claims = {
        "aud": "nats-authorization-request",
        "sub": callout.public_nkey(server, 13 << 3),
        "nats": {
            "server_id": {"id": "NSERVER", "name": "nats-0"},
            "user_nkey": "UCONNECTION",
            "connect_opts": {"user": user, "pass": password, "protocol": 1},
            "type": "authorization_request",
            "version": 2,
        },
    }
    return callout.encode(claims, server).encode()


def test_an_account_nkey_is_written_as_nkeys_writes_it() -> None:
    key = Ed25519PrivateKey.generate()
    nkey = callout.public_nkey(key)
    raw = base64.b32decode(nkey + "=" * (-len(nkey) % 8))
    assert nkey.startswith("A") and len(nkey) == 56 and len(raw) == 35
    assert raw[0] == 0 and int.from_bytes(raw[-2:], "little") == callout._crc16(raw[:-2])
    assert callout._crc16(b"123456789") == 0x31C3  # CRC-16/XMODEM's check value


def test_a_jobs_own_credentials_get_its_workspaces_subjects_only() -> None:
    signer = Ed25519PrivateKey.generate()
    user = callout.workspace_user("team-a", "tune-1")
    response = verified(
        callout.respond(request(user, callout.workspace_password(KEY, user)), signer, KEY).decode(), signer
    )
    assert response["sub"] == "UCONNECTION" and response["aud"] == "NSERVER"
    assert response["iss"] == callout.public_nkey(signer)
    nats = response["nats"]
    assert isinstance(nats, dict) and "error" not in nats
    granted = verified(nats["jwt"], signer)
    assert granted["sub"] == "UCONNECTION" and granted["aud"] == "$G" and granted["name"] == user
    permissions = granted["nats"]
    assert isinstance(permissions, dict)
    assert permissions["pub"] == {"allow": [
        "kaiten.tuning.progress.team-a.tune-1", "kaiten.workload.job_started.team-a.tune-1",
        "kaiten.workload.job_succeeded.team-a.tune-1", "kaiten.workload.job_failed.team-a.tune-1",
    ]}  # fmt: skip
    assert permissions["sub"] == {"allow": ["_INBOX_tuning.team-a.tune-1.>"]}


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("tuning.team-a.tune-1", "not-the-password"),
        ("tuning.team-a.other", callout.workspace_password(KEY, "tuning.team-a.tune-1")),  # another's
        ("tuning", KEY),  # the key itself is no user's password
        ("tuning.team-a", callout.workspace_password(KEY, "tuning.team-a")),
        ("watcher", "anything"),
        ("", ""),
    ],
)
def test_anything_else_is_refused(user: str, password: str) -> None:
    signer = Ed25519PrivateKey.generate()
    response = verified(callout.respond(request(user, password), signer, KEY).decode(), signer)
    nats = response["nats"]
    assert isinstance(nats, dict) and "jwt" not in nats and nats["error"]
