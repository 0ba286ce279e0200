"""Each tuning job's own NATS user, scoped to its Workspace's subjects: NATS auth callout.

A cluster's bus knows the services' users from its config; a tuning job's user cannot be written there
in advance (one per Workspace). So the server hands every other connection to this responder
(``auth_callout`` in ``nats.conf``, subject ``$SYS.REQ.USER.AUTH``), which checks the credentials and
answers with a user JWT that carries the permissions:

- the user is ``tuning.<namespace>.<name>``, its password :func:`workspace_password`, an HMAC of the
  user with the key only the workload and this responder hold (the chart's ``tuning`` key). The
  workload writes it into the Workspace's ``<ws>-nats`` Secret; nothing else can make one;
- it may publish that Workspace's tuning progress and job outcome (:func:`workspace_permissions`)
  and receive replies on its own inbox prefix (``_INBOX_tuning.<namespace>.<name>``); nothing else.

The JWTs are NATS's v2 claims, signed Ed25519 with an account key (``issuer`` in the config) that
``keygen`` makes where the server starts (the chart: an init container of the NATS pod, into memory
shared with this responder). NKeys are written as nats-io/nkeys writes them (a prefix byte, the raw
key, CRC-16/XMODEM, base32); ``cryptography`` signs (the ``nkeys`` package would need pynacl too).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

SUBJECT = "$SYS.REQ.USER.AUTH"
USER_PREFIX = "tuning"
_ACCOUNT_PREFIX = 0  # 'A...'
_GLOBAL_ACCOUNT = "$G"  # the account of a config file's users


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def public_nkey(key: Ed25519PrivateKey, prefix: int = _ACCOUNT_PREFIX) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    data = bytes([prefix]) + raw
    data += _crc16(data).to_bytes(2, "little")
    return base64.b32encode(data).decode().rstrip("=")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(claims: dict[str, Any], key: Ed25519PrivateKey) -> str:
    """A NATS v2 JWT: ``claims`` with ``iat``, ``iss`` and ``jti`` set, signed by ``key``."""
    body = {**claims, "iat": int(time.time()), "iss": public_nkey(key), "jti": ""}
    body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body).encode()).digest()).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body).encode())
    signature = key.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


def claims_of(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (the server's request: only the server publishes on SUBJECT)."""
    result: dict[str, Any] = json.loads(_unb64(token.split(".")[1]))
    return result


def workspace_user(namespace: str, name: str) -> str:
    return f"{USER_PREFIX}.{namespace}.{name}"


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


def workspace_password(key: str, user: str) -> str:
    """What ``user`` connects with: an HMAC of its name under the tuning key."""
    return hmac.new(key.encode(), user.encode(), hashlib.sha256).hexdigest()


def workspace_permissions(namespace: str, name: str) -> dict[str, Any]:
    """Its Workspace's tuning progress and job outcome, its own inbox; nothing else."""
    kinds = ("tuning.progress", "workload.job_started", "workload.job_succeeded", "workload.job_failed")
    user = workspace_user(namespace, name)
    return {
        "pub": {"allow": [f"kaiten.{kind}.{namespace}.{name}" for kind in kinds]},
        "sub": {"allow": [f"{inbox_prefix(user)}.>"]},
    }


def scope(user: str, password: str, key: str) -> tuple[str, str] | None:
    """(namespace, name) of a tuning job's credentials; None for anything else."""
    parts = user.split(".")
    if len(parts) != 3 or parts[0] != USER_PREFIX or not all(parts[1:]):
        return None
    if not hmac.compare_digest(workspace_password(key, user), password):
        return None
    return parts[1], parts[2]


def respond(request: bytes, signer: Ed25519PrivateKey, tuning_key: str) -> bytes:
    """The authorization response (a JWT) to the server's request (a JWT)."""
    nats = claims_of(request.decode())["nats"]
    user_nkey, server = nats["user_nkey"], nats["server_id"]["id"]
    options = nats.get("connect_opts") or {}
    user = str(options.get("user") or "")
    found = scope(user, str(options.get("pass") or ""), tuning_key)
    response: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if found is None:
        log.warning("refused a connection as %r: not a tuning job's credentials", user[:80])
        response["error"] = "not a tuning job's credentials"
    else:
        permissions = workspace_permissions(*found)
        user_claims = {
            "sub": user_nkey,
            "aud": _GLOBAL_ACCOUNT,
            "name": user,
            "nats": {**permissions, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2},
        }
        response["jwt"] = encode(user_claims, signer)
        log.info("admitted %s", user)
    return encode({"sub": user_nkey, "aud": server, "nats": response}, signer).encode()


# -- keygen and serve (the NATS pod's init container and sidecar) -----------------------------------


def keygen(directory: Path) -> str:
    """A new account key: ``issuer.key`` (PEM, 0600) and ``callout.conf`` (the config's ``issuer``)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "issuer.key"
    path.touch(mode=0o600)
    path.write_bytes(pem)
    issuer = public_nkey(key)
    (directory / "issuer.conf").write_text(f'issuer: "{issuer}"\n')
    return issuer


def load_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key")
    return key


async def serve(
    url: str,
    user: str,
    password: str,
    key_file: Path,
    tuning_key: str,
    ca_file: str | None,
    start_timeout: float = 60.0,
) -> None:
    """Answer the server's callouts until cancelled. It starts beside the server (the same pod), so it
    waits up to ``start_timeout`` for it; once the connection is closed for good it exits (the pod's
    restart policy brings it back) rather than stand by deaf."""
    from shared.bus.connection import connect
    from shared.bus.errors import BusUnavailable

    signer = load_key(key_file)
    deadline = time.monotonic() + start_timeout
    closed = asyncio.Event()
    while True:
        try:
            nc = await connect(url, name="auth-callout", user=user, password=password, ca_file=ca_file,
                               inbox_prefix=f"_INBOX_{user}", closed=closed)  # fmt: skip
            break
        except BusUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)

    async def handle(msg: Any) -> None:
        try:
            await msg.respond(respond(msg.data, signer, tuning_key))
        except Exception:
            log.exception("auth callout: could not answer a request")

    try:
        await nc.subscribe(SUBJECT, queue="auth-callout", cb=handle)
        await nc.flush()
        log.info("auth callout: answering %s as %s", SUBJECT, user)
        await closed.wait()
        raise SystemExit("auth callout: the connection to the bus is closed for good; exiting")
    finally:
        if not nc.is_closed:
            await nc.close()


def main(argv: list[str]) -> None:
    import os
    import signal

    # the first process of its container: without a handler SIGTERM is ignored there, and the pod
    # waited out its whole grace period at every stop (helm uninstall: 31 s instead of 3)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) == 2 and argv[0] == "keygen":
        print(f"issuer {keygen(Path(argv[1]))}")
    elif len(argv) == 1 and argv[0] == "serve":
        env = os.environ
        asyncio.run(
            serve(
                env["KAITEN_NATS_URL"],
                env["KAITEN_NATS_USER"],
                env["KAITEN_NATS_PASSWORD"],
                Path(env["KAITEN_CALLOUT_KEY_FILE"]),
                env["KAITEN_TUNING_NATS_PASSWORD"],
                env.get("KAITEN_NATS_CA_FILE") or None,
            )
        )
    else:
        sys.exit("usage: python -m shared.bus.callout keygen DIR | serve")


if __name__ == "__main__":
    main(sys.argv[1:])
