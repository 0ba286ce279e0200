"""``aks``: one AKS agent pool per Workspace (KAITO's "gpu-provisioner"), through the Azure SDK
(``azure-mgmt-containerservice`` aio client) with ``DefaultAzureCredential`` (workload identity in a
cluster, a service principal from the environment elsewhere).

- The pool name is ``ws`` + 10 hex characters of a hash of the Workspace's namespace, name and uid:
  valid for AKS (≤ 12 lowercase alphanumerics, starting with a letter), the same on every pass,
  restart and replica — so a second pool is never created — and different for a recreated namesake.
- VM size = the plan's SKU, count = the plan's nodes, node labels = the labelSelector's plus
  ``kaito.sh/workspace``/``kaito.sh/workspacenamespace``, taint ``sku=gpu:NoSchedule`` on GPU SKUs,
  tags naming the Workspace. A changed count is a PUT of the same pool (AKS scales it); a changed VM
  size cannot be (AKS pools are single-size), so the plan is refused with a clear reason.
- ``ensure`` never blocks on the long-running operation: it starts it (keeping the poller, whose
  interval is a setting: the SDK default is 30 s) and reports pending; later passes read the pool's
  ``provisioningState``, then wait for the pool's Nodes to be Ready in the cluster.
- Errors: the SDK retries 429 (honouring ``Retry-After``) and 5xx itself; what is left is mapped —
  still throttled or 5xx → :class:`Transient` (the reconcile loop tries again after ``Retry-After``),
  quota / SKU not available / invalid parameters / auth → :class:`ProviderError` with Azure's code
  and message (no retry loop).
- ``release`` deletes the pool and reports done once ARM answers 404, so a deleted Workspace never
  leaks a pool (the finalizer waits for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from kubernetes_asyncio import client as kclient
from kubernetes_asyncio.client.exceptions import ApiException

from services.provisioner.providers.base import GPU_TAINT, NodeRequest, Progress, ProviderError, short_id
from shared import logs
from shared.errors import Transient
from shared.events import WorkspaceRef
from shared.kube.errors import classify
from shared.metrics import PROVIDER_ERRORS
from shared.planning.model import NodeInfo

log = logging.getLogger(__name__)
POOL_LABEL = "kubernetes.azure.com/agentpool"
PERMANENT = {
    "QuotaExceeded",
    "OperationNotAllowed",
    "SkuNotAvailable",
    "ZonalAllocationFailed",
    "AllocationFailed",
    "InvalidParameter",
    "BadRequest",
    "AuthorizationFailed",
    "AuthenticationFailed",
    "LinkedAuthorizationFailed",
    "ResourceGroupNotFound",
    "ResourceNotFound",
    "SubscriptionNotFound",
}


OS_SKUS = {"ubuntu": "Ubuntu", "azurelinux": "AzureLinux"}  # node image family → the pool's osSKU


def pool_name(workspace: WorkspaceRef) -> str:
    return "ws" + short_id(workspace, 10)


def pool_body(request: NodeRequest) -> Any:
    """The ``AgentPool`` to PUT (the SDK model: its JSON is ``{"properties": {"vmSize": …}}``)."""
    from azure.mgmt.containerservice.models import AgentPool

    body: dict[str, Any] = {
        "count": request.count,
        "vm_size": request.instance_type,
        "mode": "User",
        "os_type": "Linux",
        "type_properties_type": "VirtualMachineScaleSets",
        "node_labels": request.node_labels,
        "tags": {
            "kaiten.sh/workspace": request.workspace.name,
            "kaiten.sh/namespace": request.workspace.namespace,
            "kaiten.sh/uid": request.workspace.uid,
        },
    }
    if request.gpus_per_node:
        body["node_taints"] = [f"{GPU_TAINT['key']}={GPU_TAINT['value']}:{GPU_TAINT['effect']}"]
    if request.image_family:  # KAITO's kaito.sh/node-image-family; unset: AKS's default (Ubuntu)
        body["os_sku"] = OS_SKUS[request.image_family]
    return AgentPool(**body)


def azure_error(exc: BaseException, what: str) -> BaseException:
    """A Transient or ProviderError for an SDK exception (the message never carries credentials)."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    if isinstance(exc, ClientAuthenticationError):
        return ProviderError("AzureAuthenticationFailed", f"{what}: Azure sign-in failed: {exc.message}")
    if isinstance(exc, ServiceRequestError):
        return Transient(f"{what}: Azure unreachable: {exc.message}")
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        code = (exc.error.code if exc.error is not None else "") or f"Http{status}"
        PROVIDER_ERRORS.labels("aks", str(status), code).inc()
        message = (exc.error.message if exc.error is not None else "") or str(exc.message)
        if status == 429 or status >= 500 or (status == 409 and code not in PERMANENT):
            headers = getattr(exc.response, "headers", None) or {}
            retry = headers.get("Retry-After")
            return Transient(
                f"{what}: Azure {status} {code}: {message}",
                retry_after=float(retry) if retry and retry.isdigit() else None,
            )
        return ProviderError(code, f"{what}: {message}")
    return exc


class AksProvider:
    name = "aks"
    condition = ""

    def __init__(
        self,
        *,
        api: kclient.ApiClient,
        subscription_id: str,
        resource_group: str,
        cluster: str,
        arm_endpoint: str = "https://management.azure.com",
        polling_interval: float = 10.0,
        ca_bundle: str = "",
        credential: Any = None,
    ) -> None:
        from azure.identity.aio import DefaultAzureCredential
        from azure.mgmt.containerservice.aio import ContainerServiceClient

        self._core = kclient.CoreV1Api(api)
        self._api = api
        self._rg, self._cluster = resource_group, cluster
        self._polling = polling_interval
        verify: dict[str, Any] = {"connection_verify": ca_bundle} if ca_bundle else {}
        self._credential = credential or DefaultAzureCredential(**verify)
        scope = arm_endpoint.rstrip("/") + "/.default"
        self._client = ContainerServiceClient(
            self._credential,
            subscription_id,
            base_url=arm_endpoint,
            credential_scopes=[scope],
            polling_interval=polling_interval,
            **verify,
        )
        self._ops: dict[str, tuple[str, asyncio.Task[Any]]] = {}  # pool → (kind, its operation's poller)

    async def _get(self, pool: str, what: str) -> Any | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return await self._client.agent_pools.get(self._rg, self._cluster, pool)
        except ResourceNotFoundError:
            return None
        except Exception as exc:
            raise azure_error(exc, what) from exc

    def _settled(self, pool: str) -> BaseException | None:
        """The outcome of this process's last operation on the pool, once it has finished."""
        _, task = self._ops.get(pool, ("", None))
        if task is None or not task.done():
            return None
        del self._ops[pool]
        exc = None if task.cancelled() else task.exception()
        return azure_error(exc, f"agent pool {pool}") if exc is not None else None

    def _run(self, pool: str, start: Any) -> None:
        async def drive() -> Any:
            poller = await start
            return await poller.result()

        self._ops[pool] = ("put", asyncio.create_task(drive(), name=f"aks:{pool}"))

    async def ensure(self, request: NodeRequest) -> Progress:
        name = pool_name(request.workspace)
        what = f"agent pool {name}"
        outcome = self._settled(name)
        if isinstance(outcome, ProviderError):
            return Progress(state="failed", reason=outcome.reason, message=outcome.message)
        if outcome is not None:
            raise outcome
        if name in self._ops:
            return Progress(state="pending", reason="Provisioning", message=f"{what}: operation in progress")
        pool = await self._get(name, what)
        if pool is None or (
            pool.count != request.count and pool.provisioning_state in ("Succeeded", "Failed")
        ):
            if pool is not None and pool.vm_size != request.instance_type:
                return Progress(
                    state="failed",
                    reason="InstanceTypeChanged",
                    message=f"{what} has {pool.vm_size} nodes; AKS cannot change a pool's VM size",
                )
            verb = "creating" if pool is None else f"resizing {pool.count} → {request.count} node(s) of"
            logs.of(log, request.workspace).info(
                "%s %s (%d × %s)",
                verb,
                what,
                request.count,
                request.instance_type,
            )
            self._run(
                name,
                self._client.agent_pools.begin_create_or_update(
                    self._rg, self._cluster, name, pool_body(request), polling_interval=self._polling
                ),
            )
            return Progress(state="pending", reason="Provisioning", message=f"{verb} {what}")
        state = pool.provisioning_state
        if state == "Failed":
            return Progress(state="failed", reason="AgentPoolFailed", message=f"{what} provisioning failed")
        if state != "Succeeded":
            return Progress(state="pending", reason="Provisioning", message=f"{what} is {state}")
        return await self._nodes(request, name)

    async def _nodes(self, request: NodeRequest, name: str) -> Progress:
        try:
            found = await self._core.list_node(label_selector=f"{POOL_LABEL}={name}")
        except ApiException as exc:
            raise classify(exc, f"[{request.workspace.key}] list nodes of {name}") from exc
        nodes = sorted(
            (NodeInfo.from_node(self._api.sanitize_for_serialization(n)) for n in found.items),
            key=lambda n: n.name,
        )
        ready = tuple(n.name for n in nodes if n.ready)
        if len(ready) >= request.count:
            return Progress(
                state="ready",
                nodes=ready[: request.count],
                message=f"agent pool {name}: {len(ready)} node(s) Ready",
            )
        return Progress(
            state="pending",
            nodes=ready,
            reason="WaitingForNodes",
            message=f"agent pool {name} succeeded; {len(ready)} of {request.count} node(s) Ready",
        )

    async def release(self, workspace: WorkspaceRef) -> bool:
        name = pool_name(workspace)
        what = f"delete agent pool {name}"
        kind, task = self._ops.get(name, ("", None))
        if kind == "put" and task is not None:
            task.cancel()  # stop polling a create we are about to delete (the operation itself goes on)
            with contextlib.suppress(BaseException):
                await task
            del self._ops[name]
        elif kind == "delete" and task is not None and task.done():
            del self._ops[name]
            if not task.cancelled() and task.exception() is not None:  # e.g. a 409 mid-operation: again
                logs.of(log, workspace).warning("%s: %s", what, azure_error(task.exception(), what))  # type: ignore[arg-type]
        pool = await self._get(name, what)
        if pool is None:
            return True
        if pool.provisioning_state != "Deleting":
            try:
                poller = await self._client.agent_pools.begin_delete(
                    self._rg, self._cluster, name, polling_interval=self._polling
                )
            except Exception as exc:
                raise azure_error(exc, what) from exc
            self._ops[name] = ("delete", asyncio.create_task(poller.result(), name=f"aks:delete:{name}"))
            logs.of(log, workspace).info("deleting agent pool %s", name)
        return await self._get(name, what) is None

    async def close(self) -> None:
        for _, task in self._ops.values():
            task.cancel()
        await self._client.close()
        await self._credential.close()
