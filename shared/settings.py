"""Typed settings read from the environment in one place (``KAITEN_*``).

Each service subclasses :class:`ServiceSettings`; every field says its unit and why its default.
"""

from __future__ import annotations

import os
from typing import Any, Self, get_origin

from pydantic import BaseModel, ConfigDict, SecretStr


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nats_url: str = "nats://127.0.0.1:4222"  # the local default; a cluster sets the Service URL
    nats_credentials: str | None = None  # path to a .creds file (NATS JWT accounts)
    nats_user: str | None = None  # a user of the server's config (the chart: one per service)
    nats_password: SecretStr | None = None  # that user's password (the chart: from a Secret); never logged
    nats_inbox_prefix: str = "_INBOX"  # replies come here; the chart gives each service its own prefix, so
    # a user may subscribe to its own replies only (_INBOX_<service>.>)
    nats_ca_file: str | None = None  # verify a TLS server (tls:// URL) against this CA bundle
    kubeconfig: str | None = None  # unset: $KUBECONFIG, then in-cluster
    log_level: str = "INFO"
    connect_timeout_s: float = 10.0  # fail start-up loudly rather than hang
    shutdown_grace_s: float = 10.0  # in-flight work gets this long after SIGTERM
    replica_id: str = ""  # logged; defaults to hostname:pid
    probe_port: int | None = None  # /healthz /readyz /metrics on this port (0: any free port); unset: off
    probe_host: str = "127.0.0.1"  # in a pod of its own network: 0.0.0.0, so the kubelet can probe
    probe_port_file: str | None = None  # write the bound probe port here (kaiten up: with port 0)
    stuck_after_s: float = 30.0  # /healthz fails once the event loop has not run for this long

    @classmethod
    def env_help(cls, prefix: str = "KAITEN_") -> str:
        """One line per setting: its variable, type and default (what ``--help`` prints)."""
        lines = []
        for name, field in cls.model_fields.items():
            plain = isinstance(field.annotation, type) and get_origin(field.annotation) is None
            kind = field.annotation.__name__ if plain else str(field.annotation)  # type: ignore[union-attr]
            default = field.get_default(call_default_factory=True)
            shown = ",".join(map(str, default)) if isinstance(default, tuple | list) else default
            lines.append(f"  {prefix + name.upper():<36} {kind:<12} default: {shown!r}")
        return "\n".join(lines)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, prefix: str = "KAITEN_") -> Self:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(prefix + name.upper())
            if raw is None:
                continue
            if field.annotation in (list[str], tuple[str, ...]):
                values[name] = [item for item in raw.split(",") if item]
            else:
                values[name] = raw
        return cls.model_validate(values)
