"""One behaviour suite for every provider (local, byo, nodeclaim, aks), each against its real
counterpart (the test apiserver; a NodeClaim CRD with the test playing Karpenter; the ARM-protocol
server playing Azure): it converges to ready, repeating ``ensure`` (or a second replica, or a restart)
creates nothing twice, it resizes in place, and ``release`` leaves nothing behind, twice over."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from kaiten.local.controlplane import ControlPlane
from services.provisioner.providers.base import NodeRequest, Progress, Provider
from shared.errors import Transient
from shared.events import WorkspaceRef
from shared.kube.client import api_client
from tests.arm_server import ArmServer
from tests.conftest import Kubectl
from tests.test_planner_e2e import add_gpu_node
from tests.test_provisioner_aks import SECRET
from tests.test_provisioner_aks import arm as arm  # the fixture, re-exported for this module
from tests.test_provisioner_nodeclaim import CRD, claims, launch

pytestmark = [pytest.mark.controlplane]
PROVIDERS = ["local", "byo", "nodeclaim", "aks"]


@dataclass
class Harness:
    make: Callable[[], Provider]  # a provider instance (a second one plays another replica/restart)
    cloud: Callable[[], None]  # what the outside world does between passes (launch claims, time)
    resources: Callable[[], set[str]]  # what exists for the Workspace outside Kaiten (claims, pools)
    request: NodeRequest
    resizable: bool = True


@pytest_asyncio.fixture(params=PROVIDERS)
async def harness(
    request: pytest.FixtureRequest, controlplane: ControlPlane, kubectl: Kubectl, tmp_path: Path
) -> AsyncIterator[Harness]:
    api = await api_client(str(controlplane.kubeconfig))
    tag = uuid.uuid4().hex[:8]
    ref = WorkspaceRef(namespace="contract", name=f"w-{tag}", uid=str(uuid.uuid4()))
    base = NodeRequest(
        workspace=ref,
        generation=1,
        instance_type="Standard_NC12s_v3",
        count=2,
        gpus_per_node=1,
        labels={"apps": f"contract-{tag}"},
        selector={"matchLabels": {"apps": f"contract-{tag}"}},
    )
    nodes_made: list[str] = []
    try:
        if request.param == "local":
            from services.provisioner.providers.local import LocalProvider

            local = NodeRequest(workspace=ref, generation=1, instance_type="local", count=1)
            yield Harness(
                make=lambda: LocalProvider("kaiten-local"),
                cloud=lambda: None,
                resources=set,
                request=local,
                resizable=False,
            )
        elif request.param == "byo":
            from services.provisioner.providers.byo import ByoProvider

            for i in range(3):
                name = f"contract-{tag}-{i}"
                add_gpu_node(kubectl, name, f"contract-{tag}")
                nodes_made.append(name)
            yield Harness(make=lambda: ByoProvider(api), cloud=lambda: None, resources=set, request=base)
        elif request.param == "nodeclaim":
            from services.provisioner.providers.nodeclaim import NodeClaimProvider

            kubectl.run("apply", "-f", str(CRD), check=True)
            kubectl.wait_established("nodeclaims.karpenter.sh")
            node_class = {"group": "karpenter.azure.com", "kind": "AKSNodeClass", "name": "default"}

            def mine() -> list[dict[str, Any]]:
                from services.provisioner.providers.base import short_id

                return claims(kubectl, short_id(ref))

            def karpenter() -> None:
                for claim in mine():
                    if not (claim.get("status") or {}).get("nodeName"):
                        nodes_made.append(launch(kubectl, claim))

            yield Harness(
                make=lambda: NodeClaimProvider(api, node_class),
                cloud=karpenter,
                resources=lambda: {c["metadata"]["name"] for c in mine()},
                request=base,
            )
        else:
            from services.provisioner.providers.aks import AksProvider

            server: ArmServer = request.getfixturevalue("arm")
            server.duration = 0.5
            env = {
                "AZURE_TENANT_ID": "tenant-kaiten",
                "AZURE_CLIENT_ID": "client-kaiten",
                "AZURE_CLIENT_SECRET": SECRET,
                "AZURE_AUTHORITY_HOST": server.url,
            }
            monkeypatch = request.getfixturevalue("monkeypatch")
            for key, value in env.items():
                monkeypatch.setenv(key, value)

            def aks() -> Provider:
                return AksProvider(
                    api=api,
                    subscription_id="sub",
                    resource_group="rg",
                    cluster="cl",
                    arm_endpoint=server.url,
                    polling_interval=0.1,
                    ca_bundle=str(server.cert),
                )

            yield Harness(make=aks, cloud=server.tick, resources=lambda: set(server.pools), request=base)
    finally:
        if nodes_made:
            kubectl.run("delete", "node", *nodes_made, "--ignore-not-found")
        await api.close()


async def converge(
    provider: Provider, request: NodeRequest, cloud: Callable[[], None], timeout: float = 30
) -> Progress:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            progress = await provider.ensure(request)
        except Transient as exc:  # as the reconcile loop does: try again on the next pass
            progress = Progress(state="pending", message=str(exc))
        if progress.state != "pending":
            return progress
        assert asyncio.get_running_loop().time() < deadline, f"still pending: {progress.message}"
        await asyncio.to_thread(cloud)
        await asyncio.sleep(0.2)


async def release(
    provider: Provider, ref: WorkspaceRef, cloud: Callable[[], None], timeout: float = 30
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await _released(provider, ref):
        assert asyncio.get_running_loop().time() < deadline, "release did not finish"
        await asyncio.to_thread(cloud)
        await asyncio.sleep(0.2)


async def test_converges_creates_nothing_twice_resizes_and_releases(harness: Harness) -> None:
    first, second = harness.make(), harness.make()  # two replicas (or one, restarted)
    try:
        request = harness.request
        ready = await converge(first, request, harness.cloud)
        assert ready.state == "ready" and len(ready.nodes) == request.count, ready
        created = harness.resources()
        for provider in (first, first, second):
            again = await provider.ensure(request)
            assert (again.state, again.nodes) == ("ready", ready.nodes)
        assert harness.resources() == created  # nothing made twice

        if harness.resizable:
            smaller = NodeRequest(**{**_fields(request), "generation": 2, "count": 1})
            resized = await converge(second, smaller, harness.cloud)
            assert resized.state == "ready" and len(resized.nodes) == 1
            assert resized.nodes[0] in ready.nodes  # resized in place, not recreated
            assert len(harness.resources()) <= len(created)

        await release(first, request.workspace, harness.cloud)
        assert await second.release(request.workspace)  # releasing again is fine
        assert harness.resources() == set()
    finally:
        await first.close()
        await second.close()


async def _released(provider: Provider, ref: WorkspaceRef) -> bool:
    try:
        return await provider.release(ref)
    except Transient:
        return False


def _fields(request: NodeRequest) -> dict[str, Any]:
    return {f: getattr(request, f) for f in request.__struct_fields__}


def test_harness_covers_every_provider() -> None:
    from services.provisioner.main import PROVIDERS as SHIPPED

    assert sorted(SHIPPED) == sorted(PROVIDERS)
