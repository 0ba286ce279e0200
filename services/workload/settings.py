"""Workload settings (environment ``KAITEN_*``)."""

from __future__ import annotations

from pydantic import SecretStr, field_validator

from shared.settings import ServiceSettings


class WorkloadSettings(ServiceSettings):
    backend: str = "local"  # local (the Ray cluster of kaiten up) or kuberay (RayService / RayJob objects)
    ray_image: str = (
        "kaiten-ray:0.1.0"  # kuberay: the Ray image with kaiten[serving,tuning,gpu] (deploy/images)
    )
    ray_host_network: str = ""  # kuberay: Ray pods on the node's network, bound to this address (a node
    # without a pod network, such as the test node: 127.0.0.1); single-node plans only. Unset: pod network
    network_policy: bool = True  # kuberay: a NetworkPolicy per Workspace fences its Ray pods (install.md)
    ray_operator_labels: tuple[str, ...] = ("app.kubernetes.io/name=kuberay-operator",)  # KubeRay's pods:
    # they may reach the dashboard, GCS and client ports (key=value labels)
    control_namespace: str = ""  # Kaiten's own namespace (the chart sets it): its workload may reach them too
    tuning_nats_user: str = ""  # kuberay: tuning jobs publish as this NATS user (the chart: "tuning") …
    tuning_nats_password: SecretStr | None = None  # … with this password, put in a Secret per Workspace
    ray_dashboard_url: str = ""  # the local Ray dashboard (Serve and Jobs REST APIs)
    ray_token_path: str = ""  # the Ray cluster's auth token file (RayHead.token_path)
    serve_port: int = 8000  # Ray Serve's HTTP proxy port on 127.0.0.1
    reconcile_interval_s: float = 2.0  # how often deploying applications are checked
    deploy_timeout_s: float = 900.0  # an application not RUNNING after this has failed
    work_dir: str = (
        ""  # tuning job configs and push-secret copies (0600); default ~/.local/state/kaiten/workload
    )
    allow_loopback_urls: bool = False  # tuning inputs on 127.0.0.1: local runs only (kaiten up sets it)

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
