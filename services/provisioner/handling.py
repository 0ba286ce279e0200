"""The provisioner's work: plans become node requests, a reconcile loop drives them to ready or failed,
and a deleted Workspace's nodes are released before cleanup is reported.

- ``plan.resolved`` (newest generation of a burst): the request is recorded in KV (``pending``),
  ``nodes.requested`` is published, and one reconcile pass runs at once.
- The reconcile loop (:meth:`Provisioner.run`) passes over every ``pending`` entry each
  ``reconcile_interval_s``: ``ensure`` → ``nodes.ready`` | ``nodes.failed`` | a ``NodesReady=False``
  progress condition when the provider's message changes. A request pending past its timeout fails.
  Transient provider errors (throttling, 5xx) are retried on the next pass, honouring ``retry_after``.
- ``workspace.deleting``: the entry is marked ``deleting`` (so no pass re-creates anything), the
  provider releases until nothing is left (the message is redelivered with backoff until then), the
  entry is removed and ``status.cleanup_done`` (owner ``provisioner``) lets the finalizer go.

One asyncio lock per Workspace keeps a reconcile pass and a deletion of the same Workspace from
interleaving in this process. Across replicas the Workspace's lease (``shared.bus.leases``, the one the
consumer takes for events) is taken by every reconcile pass too, so a pass on one replica and a
deletion on another never interleave; a pass writes its outcome only if the entry is still at the
revision it read; and providers are idempotent by construction (names from the Workspace uid).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from nats.js.errors import KeyWrongLastSequenceError

from services.provisioner.providers.base import NodeRequest, Progress, Provider, ProviderError
from services.provisioner.store import NodeStore, StoredNodes, key_of
from shared import events as ev
from shared import failpoints, logs, telemetry
from shared.bus.leases import LeaseBusy, Leases
from shared.bus.publishing import Publisher
from shared.bus.reconciling import reconcile_forever
from shared.errors import Transient
from shared.metrics import PROVIDER_CALLS

log = logging.getLogger("kaiten.provisioner")
OWNER = "provisioner"


def request_from_plan(event: ev.PlanResolved) -> NodeRequest:
    plan, resource = event.plan, event.resource
    return NodeRequest(
        workspace=event.workspace,
        generation=event.generation,
        instance_type=plan.sku,
        count=plan.nodes,
        gpus_per_node=plan.gpus_per_node,
        labels=dict(resource.label_selector.match_labels),
        selector=msgspec.to_builtins(resource.label_selector),
        preferred_nodes=resource.preferred_nodes,
        byo_nodes=plan.byo_nodes,
    )


class Provisioner:
    def __init__(
        self,
        *,
        provider: Provider,
        store: NodeStore,
        publisher: Publisher,
        leases: Leases,
        interval: float = 5.0,
        timeout: float = 1800.0,
    ) -> None:
        self._provider = provider
        self._store = store
        self._publisher = publisher
        self._leases = leases
        self._interval = interval
        self._timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self._not_before: dict[str, float] = {}  # key → monotonic time (a provider's Retry-After)

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # -- events ---------------------------------------------------------------------------------------

    async def handle(self, events: Sequence[ev.AnyEvent]) -> None:
        last = events[-1]
        if isinstance(last, ev.WorkspaceDeleting):
            await self._release(last)
            return
        plans = [e for e in events if isinstance(e, ev.PlanResolved)]
        if plans:
            await self._request(max(plans, key=lambda e: e.generation))

    async def _request(self, event: ev.PlanResolved) -> None:
        ref = event.workspace
        async with self._lock(ref.key):
            stored = await self._store.get(ref)
            if (
                stored is not None
                and stored.uid == ref.uid
                and (stored.phase == "deleting" or stored.generation > event.generation)
            ):
                log.info("[%s] plan of generation %d dropped (%s)", ref.key, event.generation, stored.phase)
                return
            request = request_from_plan(event)
            same = stored is not None and stored.uid == ref.uid and stored.request == request
            if same and stored is not None and stored.phase != "pending":
                return  # a redelivery of a request already settled
            since = stored.since if same and stored is not None else time.time()
            await self._store.put(
                ref,
                StoredNodes(
                    uid=ref.uid,
                    generation=event.generation,
                    request=request,
                    phase="pending",
                    since=since,
                    trace=telemetry.carrier(),
                ),
            )
            await self._publisher.publish(
                ev.NodesRequested(
                    workspace=ref,
                    generation=event.generation,
                    correlation_id=event.correlation_id,
                    provider=self._provider.name,
                    count=request.count,
                    instance_type=request.instance_type,
                )
            )
            log.info(
                "[%s] gen %d: %d × %s requested from %s",
                ref.key,
                event.generation,
                request.count,
                request.instance_type,
                self._provider.name,
            )
        await self.reconcile(key_of(ref), ref)

    async def _release(self, event: ev.WorkspaceDeleting) -> None:
        ref = event.workspace
        async with self._lock(ref.key):
            stored = await self._store.get(ref)
            if stored is not None and stored.uid == ref.uid and stored.phase != "deleting":
                await self._store.put(ref, msgspec_replace(stored, phase="deleting"))
            name = self._provider.name
            try:
                with telemetry.span(f"{name} release", **{"kaito.workspace.key": ref.key}):
                    gone = await self._provider.release(ref)
            except ProviderError as exc:  # e.g. no permission to delete: say so, and keep trying
                PROVIDER_CALLS.labels(name, "release", "failed").inc()
                raise Transient(f"[{ref.key}] release: {exc.reason}: {exc.message}") from exc
            except (Transient, TimeoutError, ConnectionError):
                PROVIDER_CALLS.labels(name, "release", "retry").inc()
                raise
            PROVIDER_CALLS.labels(name, "release", "ready" if gone else "pending").inc()
            if not gone:
                raise Transient(f"[{ref.key}] nodes are still being deleted", retry_after=self._interval)
            if stored is not None and stored.uid == ref.uid:
                await self._store.forget(ref)
            await self._publisher.publish(
                ev.CleanupDone(workspace=ref, generation=event.generation, owner=OWNER)
            )
            log.info("[%s] nodes released; cleanup done", ref.key)

    # -- the reconcile loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        await reconcile_forever("reconcile", self._store.keys, self._pass, self._interval)

    async def _pass(self, key: str) -> None:
        """One pass over a pending entry, under the Workspace's lease; skipped while another replica (or
        this one's consumer) holds it — that holder is acting on the Workspace already."""
        if time.monotonic() < self._not_before.get(key, 0.0):
            return  # the provider asked us to wait (Retry-After)
        stored = await self._store.get_key(key)
        if stored is None or stored.phase != "pending":
            return
        try:
            async with self._leases.hold(stored.request.workspace.key):
                ref = stored.request.workspace
                with telemetry.resumed(stored.trace), logs.about(ref, generation=stored.generation):
                    await self.reconcile(key, ref)
        except LeaseBusy:
            return

    async def reconcile(self, key: str, ref: ev.WorkspaceRef) -> None:
        """Drive ``ref``'s pending entry one step; the caller holds the Workspace's lease."""
        async with self._lock(ref.key):
            stored, revision = await self._store.get_entry(key)  # read under the lock: deletion may have won
            if stored is None or stored.phase != "pending":
                return
            failpoints.reached("provisioner.ensure")
            calls = PROVIDER_CALLS.labels(self._provider.name, "ensure", "retry")
            try:
                with telemetry.span(f"{self._provider.name} ensure", **{"kaito.workspace.key": ref.key}):
                    progress = await self._provider.ensure(stored.request)
            except ProviderError as exc:
                progress = Progress(state="failed", reason=exc.reason, message=exc.message)
            except Transient as exc:
                calls.inc()
                self._not_before[key] = time.monotonic() + (exc.retry_after or self._interval)
                log.warning("[%s] %s; retrying", ref.key, exc)
                return
            except (TimeoutError, ConnectionError) as exc:
                calls.inc()
                log.warning("[%s] provider unreachable: %r; retrying", ref.key, exc)
                return
            PROVIDER_CALLS.labels(self._provider.name, "ensure", progress.state).inc()
            if progress.state == "pending" and time.time() - stored.since > self._timeout:
                progress = Progress(
                    state="failed",
                    reason="ProvisioningTimedOut",
                    message=f"nodes not ready after {self._timeout:.0f}s: {progress.message}",
                )
            try:
                await self._settle(key, stored, progress, revision)
            except KeyWrongLastSequenceError:
                log.warning("[%s] entry changed during the pass (deleted?); its outcome dropped", ref.key)

    async def _settle(self, key: str, stored: StoredNodes, progress: Progress, revision: int) -> None:
        ref = stored.request.workspace
        common: dict[str, Any] = {"workspace": ref, "generation": stored.generation}
        name = self._provider.name
        # Publish, then store: a crash between the two repeats the publish (the same dedupe id: stored
        # once), whereas storing first would leave a settled record whose event never went out.
        if progress.state == "ready":
            await self._condition(common, "True", "Ready", progress.message)
            await self._publisher.publish(ev.NodesReady(provider=name, nodes=progress.nodes, **common))
            failpoints.reached("provisioner.settled")
            await self._store.put(
                ref,
                msgspec_replace(stored, phase="ready", nodes=progress.nodes, message=progress.message),
                last=revision,
            )
            log.info("[%s] nodes ready: %s", ref.key, ", ".join(progress.nodes))
        elif progress.state == "failed":
            await self._condition(common, "False", progress.reason, progress.message)
            await self._publisher.publish(
                ev.NodesFailed(provider=name, reason=progress.reason, message=progress.message, **common)
            )
            failpoints.reached("provisioner.settled")
            await self._store.put(
                ref,
                msgspec_replace(stored, phase="failed", reason=progress.reason, message=progress.message),
                last=revision,
            )
            log.warning("[%s] nodes failed: %s: %s", ref.key, progress.reason, progress.message)
        elif progress.message != stored.message:
            reason = progress.reason or "Provisioning"
            await self._condition(common, "False", reason, progress.message)
            await self._publisher.publish(
                ev.ConditionReported(
                    type="NodesReady",
                    status="False",
                    reason=reason,
                    message=progress.message,
                    reporter=OWNER,
                    **common,
                )
            )
            await self._store.put(
                ref, msgspec_replace(stored, reason=progress.reason, message=progress.message), last=revision
            )

    async def _condition(
        self, common: dict[str, Any], status: ev.ConditionStatus, reason: str, message: str
    ) -> None:
        """The provider's finer condition (``NodeClaimReady`` for NodeClaims), when it has one."""
        if self._provider.condition:
            await self._publisher.publish(
                ev.ConditionReported(
                    type=self._provider.condition,
                    status=status,
                    reason=reason,
                    message=message,
                    reporter=OWNER,
                    warning=status == "False" and reason not in ("Provisioning", "WaitingForNodeClaims"),
                    **common,
                )
            )


def msgspec_replace(stored: StoredNodes, **changes: Any) -> StoredNodes:
    return msgspec.structs.replace(stored, **changes)
