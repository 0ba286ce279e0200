"""Workload settings (environment ``KAITEN_*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator

from shared.settings import ServiceSettings


class WorkloadSettings(ServiceSettings):
    backend: Literal["local", "kuberay"] = Field(
        "local", description="local (the Ray cluster of kaiten up) or kuberay (RayService / RayJob objects)."
    )
    ray_image: str = Field(
        "kaiten-ray:0.1.0",
        description="kuberay: the Ray image with kaiten[serving,tuning,gpu] (deploy/images).",
    )
    ray_host_network: str = Field(
        "",
        description="kuberay: Ray pods on the node's network at this address (a node without a pod "
        "network, such as the test node: 127.0.0.1, or its network namespace's address); Ray listens on "
        "it, Serve too when it is loopback, else on every address of the node. Single-node plans only. "
        "Empty: the pod network.",
    )
    network_policy: bool = Field(
        True, description="kuberay: a NetworkPolicy per Workspace fences its Ray pods (docs/install.md)."
    )
    ray_operator_labels: tuple[str, ...] = Field(
        ("app.kubernetes.io/name=kuberay-operator",),
        description="kuberay: KubeRay's pods (key=value labels); they may reach the dashboard, GCS and "
        "client ports.",
    )
    control_namespace: str = Field(
        "",
        description="Kaiten's own namespace (the chart sets it): its workload may reach the Ray ports too.",
    )
    tuning_nats_password: SecretStr | None = Field(
        None,
        description="kuberay: the tuning key. Each tuning job connects to the bus as its own user, "
        "tuning.<namespace>.<name>, with a password made from this key (the bus's auth callout checks it "
        "and scopes the user to that Workspace's events); it is put in a Secret per Workspace. Unset: "
        "tuning jobs report nothing. Never logged.",
    )
    ray_dashboard_url: str = Field("", description="local: the Ray dashboard (Serve and Jobs REST APIs).")
    ray_token_path: str = Field("", description="local: the Ray cluster's auth token file.")
    serve_port: int = Field(8000, description="local: Ray Serve's HTTP proxy port on 127.0.0.1.")
    reconcile_interval_s: float = Field(2.0, description="Seconds between checks of deploying applications.")
    deploy_timeout_s: float = Field(
        900.0, description="Seconds after which an application not RUNNING has failed."
    )
    work_dir: str = Field(
        "",
        description="Tuning job configs and push-secret copies (mode 0600). Empty: "
        "~/.local/state/kaiten/workload.",
    )
    allow_loopback_urls: bool = Field(
        False, description="Tuning inputs on 127.0.0.1: local runs only (kaiten up sets it)."
    )

    @field_validator("ray_operator_labels")
    @classmethod
    def _labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if bad := [item for item in value if "=" not in item or not item.split("=", 1)[0]]:
            raise ValueError(f"labels are key=value, got {', '.join(bad)}")
        return value

    def operator_labels(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (key, value) for key, _, value in (item.partition("=") for item in self.ray_operator_labels)
        )
