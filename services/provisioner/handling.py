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

What to do is decided by ``deciding`` (pure); this module only carries it out. One asyncio lock per
Workspace (``KeyLocks``) keeps a reconcile pass and a deletion of the same Workspace from interleaving
in this process. Across replicas the Workspace's lease (``shared.bus.leases``, the one the consumer
takes for events) is taken by every reconcile pass too (``shared.bus.reconciling.Reconciler``), so a
pass on one replica and a deletion on another never interleave; a pass writes its outcome only if the
entry is still at the revision it read; and providers are idempotent by construction (names from the
Workspace uid).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from nats.js.errors import KeyWrongLastSequenceError

from services.provisioner import deciding
from services.provisioner.deciding import OWNER, Outcome
from services.provisioner.providers.base import (
    NodeRequest,
    Progress,
    Provider,
    ProviderError,
    node_image_family,
)
from services.provisioner.store import NodeStore, Phase, StoredNodes
from shared import events as ev
from shared import failpoints, logs, telemetry
from shared.bus.kvstore import KeyLocks, key_of
from shared.bus.leases import Leases
from shared.bus.publishing import Publisher
from shared.bus.reconciling import Reconciler
from shared.errors import InvalidInput, Transient
from shared.metrics import PROVIDER_CALLS

log = logging.getLogger(__name__)


def request_from_plan(event: ev.PlanResolved) -> NodeRequest:
    if event.spec is None:
        raise InvalidInput(
            f"plan.resolved of schema {event.schema} carries no spec (a planner older than this "
            "provisioner); apply the Workspace again once the planner is upgraded",
            reason="PlanTooOld",
        )
    plan, resource = event.plan, event.spec.resource
    return NodeRequest(
        workspace=event.workspace,
        generation=event.generation,
        instance_type=plan.sku,
        count=plan.nodes,
        gpus_per_node=plan.gpus_per_node,
        labels=resource.label_selector.as_labels(),  # single-value In too, as KAITO reads a selector
        selector=resource.label_selector.model_dump(by_alias=True, exclude_defaults=True),
        preferred_nodes=tuple(resource.preferred_nodes),
        byo_nodes=plan.byo_nodes,
        image_family=node_image_family(event.annotations),
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
        self._decides_for = deciding.Provider(provider.name, provider.condition, timeout)
        self._store = store
        self._publisher = publisher
        self._interval = interval
        self._locks = KeyLocks()
        self._not_before: dict[str, float] = {}  # key → monotonic time (a provider's Retry-After)
        self._reconciler = Reconciler(
            "reconcile", store=store, leases=leases, due=self._due, step=self.reconcile, interval=interval
        )

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
        ref, key = event.workspace, key_of(event.workspace)
        request = request_from_plan(event)
        async with self._locks(key):
            outcome = deciding.on_plan(
                await self._store.get(key),
                event,
                request,
                provider=self._provider.name,
                now=time.time(),
                trace=telemetry.carrier(),
            )
            if outcome.dropped:
                logs.of(log, ref).info("%s", outcome.dropped)
                return
            await self._carry_out(key, outcome)
            logs.of(log, ref).info(
                "gen %d: %d × %s requested from %s",
                event.generation,
                request.count,
                request.instance_type,
                self._provider.name,
            )
        await self.reconcile(key)

    async def _release(self, event: ev.WorkspaceDeleting) -> None:
        ref, key = event.workspace, key_of(event.workspace)
        async with self._locks(key):
            stored = await self._store.get(key)
            if (marked := deciding.on_deleting(stored, ref)) is not None:
                await self._store.put(key, marked)
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
                await self._store.purge(key)
            await self._publisher.publish(
                ev.CleanupDone(workspace=ref, generation=event.generation, owner=OWNER)
            )
            logs.of(log, ref).info("nodes released; cleanup done")

    # -- the reconcile loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self._reconciler.run()

    def _due(self, key: str, stored: StoredNodes) -> bool:
        """Pending, and the provider did not ask us to wait (Retry-After)."""
        return stored.phase == Phase.PENDING and time.monotonic() >= self._not_before.get(key, 0.0)

    async def reconcile(self, key: str) -> None:
        """Drive the key's pending entry one step; the caller holds the Workspace's lease."""
        async with self._locks(key):
            stored, revision = await self._store.entry(key)  # read under the lock: deletion may have won
            if stored is None or stored.phase != Phase.PENDING:
                return
            progress = await self._ensure(key, stored)
            if progress is None:
                return
            outcome = deciding.on_progress(stored, progress, provider=self._decides_for, now=time.time())
            try:
                await self._carry_out(key, outcome, last=revision)
            except KeyWrongLastSequenceError:
                logs.of(log, stored.ref).warning("entry changed during the pass (deleted?); outcome dropped")
                return
            if outcome.record is not None and outcome.record.phase == Phase.READY:
                logs.of(log, stored.ref).info("nodes ready: %s", ", ".join(progress.nodes))
            elif outcome.record is not None and outcome.record.phase == Phase.FAILED:
                record = outcome.record
                logs.of(log, stored.ref).warning("nodes failed: %s: %s", record.reason, record.message)

    async def _ensure(self, key: str, stored: StoredNodes) -> Progress | None:
        """The provider's progress on the request; None when it must be asked again later."""
        ref, name = stored.ref, self._provider.name
        failpoints.reached("provisioner.ensure")
        try:
            with telemetry.span(f"{name} ensure", **{"kaito.workspace.key": ref.key}):
                progress = await self._provider.ensure(stored.request)
        except ProviderError as exc:
            progress = Progress(state="failed", reason=exc.reason, message=exc.message)
        except Transient as exc:
            PROVIDER_CALLS.labels(name, "ensure", "retry").inc()
            self._not_before[key] = time.monotonic() + (exc.retry_after or self._interval)
            logs.of(log, ref).warning("%s; retrying", exc)
            return None
        except (TimeoutError, ConnectionError) as exc:
            PROVIDER_CALLS.labels(name, "ensure", "retry").inc()
            logs.of(log, ref).warning("provider unreachable: %r; retrying", exc)
            return None
        PROVIDER_CALLS.labels(name, "ensure", progress.state).inc()
        self._not_before.pop(key, None)
        return progress

    async def _carry_out(self, key: str, outcome: Outcome, *, last: int | None = None) -> None:
        """Publish, then store: a crash between the two repeats the publish (the same dedupe id: stored
        once), whereas storing first would leave a settled record whose event never went out."""
        for event in outcome.publish:
            await self._publisher.publish(event)
        if outcome.settles:
            failpoints.reached("provisioner.settled")
        if outcome.record is not None:
            await self._store.put(key, outcome.record, last=last)
