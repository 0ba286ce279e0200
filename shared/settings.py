"""Typed settings read from the environment in one place (``KAITEN_*``), with pydantic-settings.

Each service subclasses :class:`ServiceSettings`; every field's description says what it does, its
unit and why its default. ``docs/configuration.md`` is generated from these classes
(``python -m kaiten.configuration``; a test fails when it is stale), and ``--help`` lists them.
Lists are comma-separated (``KAITEN_CLEANUP_OWNERS=provisioner,workload``).
"""

from __future__ import annotations

from typing import Any, Literal, Self, get_origin

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "KAITEN_"
Provider = Literal["aks", "nodeclaim", "byo", "local"]  # where nodes come from (docs/provisioning.md)
Cloud = Literal["azure", "aws"]  # whose instance types the catalog offers


class ServiceSettings(BaseSettings):
    # enable_decoding off: lists are comma-separated, not JSON (see _comma_separated)
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="forbid", frozen=True, enable_decoding=False)

    nats_url: str = Field(
        "nats://127.0.0.1:4222",
        description="The NATS server (nats:// or tls://). The local default; the chart sets its Service.",
    )
    nats_credentials: str | None = Field(None, description="A .creds file (NATS JWT accounts).")
    nats_user: str | None = Field(
        None, description="A user of the server's config (the chart: one per service)."
    )
    nats_password: SecretStr | None = Field(
        None, description="That user's password (the chart: from a Secret). Never logged."
    )
    nats_inbox_prefix: str = Field(
        "_INBOX",
        description="Replies come here. The chart gives each service its own prefix, so a user may "
        "subscribe to its own replies only (_INBOX_<service>.>).",
    )
    nats_ca_file: str | None = Field(
        None, description="Verify a TLS server (tls:// URL) against this CA bundle."
    )
    kubeconfig: str | None = Field(
        None, description="A kubeconfig file. Unset: $KUBECONFIG, then in-cluster."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text (one line per record) or json (one object per line, with the Workspace's "
        "namespace, name, uid, generation, the event id and the trace id when the record is about one).",
    )
    connect_timeout_s: float = Field(10.0, description="Seconds to reach NATS and the apiserver at start-up.")
    shutdown_grace_s: float = Field(
        10.0,
        description="Seconds in-flight work gets after SIGTERM; the process exits within this + 8 s "
        "(leases, NATS, the last traces), whatever step hangs.",
    )
    replica_id: str = Field(
        "",
        description="Logged with every line; the leader identity (shared.bus.leadership): a process "
        "restarted under the same one leads again at once. Replicas' must differ. Empty: hostname:pid.",
    )
    probe_port: int | None = Field(
        None, description="Serve /healthz, /readyz and /metrics on this port (0: any free port). Unset: off."
    )
    probe_host: str = Field(
        "127.0.0.1",
        description="The probe server's address. In a pod of its own network: 0.0.0.0, so the kubelet "
        "can probe.",
    )
    probe_port_file: str | None = Field(
        None, description="Write the bound probe port here (kaiten up, with port 0)."
    )
    stuck_after_s: float = Field(
        30.0, description="Seconds without an event-loop beat after which /healthz fails."
    )

    @field_validator("*", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields[info.field_name or ""]
        if isinstance(value, str) and get_origin(field.annotation) in (tuple, list):
            return tuple(item for item in value.split(",") if item)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def variables(cls) -> list[tuple[str, str, str, str]]:
        """(variable, type, default, description) for every setting."""
        rows = []
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            plain = isinstance(annotation, type) and get_origin(annotation) is None
            kind = annotation.__name__ if plain else str(annotation).replace("typing.", "")  # type: ignore[union-attr]
            default = field.get_default(call_default_factory=True)
            shown = ",".join(map(str, default)) if isinstance(default, tuple | list) else default
            rows.append(
                (PREFIX + name.upper(), kind, repr(shown), " ".join((field.description or "").split()))
            )
        return rows

    @classmethod
    def env_help(cls) -> str:
        """One line per setting: its variable, type and default (what ``--help`` prints)."""
        return "\n".join(
            f"  {variable:<36} {kind:<12} default: {default}"
            for variable, kind, default, _ in cls.variables()
        )

    @classmethod
    def from_env(cls) -> Self:
        """The settings from the process environment."""
        return cls()
