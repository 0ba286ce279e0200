"""The local control plane (kaiten.local.controlplane) as the services and the benchmarks use it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Kubectl

pytestmark = pytest.mark.controlplane


@pytest.mark.timeout(180)
def test_there_is_a_service_ip_for_each_of_many_workspaces(kubectl: Kubectl, namespace: str) -> None:
    """Every inference Workspace gets a ClusterIP Service. The control plane allotted a /24 (254 IPs, one
    the `kubernetes` Service's): `benchmarks/control_plane.py --sizes 1000` found the 254th refused
    ("failed to allocate a serviceIP: range is full") and those Workspaces never served (issue 20)."""
    count = 300
    services = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"ws-{i}", "namespace": namespace},
                "spec": {"ports": [{"port": 80}]},
            }
            for i in range(count)
        ],
    }
    try:
        applied = kubectl.run("apply", "-f", "-", stdin=json.dumps(services), timeout=150)
        assert applied.returncode == 0, applied.stderr[-2000:]
        got = json.loads(kubectl.run("get", "services", "-n", namespace, "-o", "json", check=True).stdout)
        ips = {item["spec"]["clusterIP"] for item in got["items"]}
        assert len(got["items"]) == count and len(ips) == count
    finally:  # no namespace controller runs here: the Services would hold their IPs for the session
        kubectl.run("delete", "services", "--all", "-n", namespace, "--wait=false", timeout=150)
