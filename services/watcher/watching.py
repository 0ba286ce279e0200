"""List-then-watch Workspaces and act on what :func:`decide` says.

- list, then watch from the list's resourceVersion (bookmarks on);
- a 410 Gone, the server-side timeout, an inactivity timeout or the resync period: list again;
- apiserver/NATS trouble: back off (bounded, logged with the attempt number) and list again.

Of several replicas only the leader runs this (``services.watcher.main``); the others stand by.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, get_args

from kubernetes_asyncio.client.exceptions import ApiException
from nats.js import JetStreamContext
from pydantic import ValidationError

from services.watcher.deciding import Action, Published, decide
from services.watcher.seen import Seen
from services.watcher.settings import WatcherSettings
from shared import logs, telemetry
from shared.api.crd import FINALIZER
from shared.api.workspace import WorkspaceSpec, WorkspaceState, spec_of
from shared.bus.backoff import delay_for
from shared.bus.kvstore import KvStore
from shared.bus.publishing import Publisher
from shared.errors import InvalidInput
from shared.events import ConditionReported, WorkspaceDeleting, WorkspaceObserved, WorkspaceRef
from shared.kube.errors import classify
from shared.kube.workspaces import Workspaces
from shared.metrics import WORKSPACES

log = logging.getLogger(__name__)
PUBLISHED_BUCKET = "kaiten_watcher_published"
OBJECT_ERRORS = (400, 403, 422)  # the apiserver refuses this object's patch: retrying will not help


def typed_spec(obj: dict[str, Any]) -> WorkspaceSpec:
    """The object's spec, validated once here for every service downstream. The CRD admits only specs
    that validate; one that does not (a CRD newer than this watcher's model) is refused on the
    Workspace, with the field and why."""
    try:
        return WorkspaceSpec.model_validate(spec_of(obj))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"spec cannot be read: {where}: {first['msg']}", reason="InvalidSpec") from exc


async def next_event(stream: Any, seconds: float) -> Any:
    """The stream's next event; TimeoutError after ``seconds``. Not ``asyncio.wait_for``: on Python
    3.11 it returns the event when a cancellation lands as the event arrives, and the cancel is lost (a
    stopping watcher read on, its shutdown waiting for it, until it was killed: a CI run)."""
    async with asyncio.timeout(seconds):
        return await anext(stream)


PublishedStore = KvStore[Published]  # per uid: what was published, shared by restarts and replicas


async def open_store(js: JetStreamContext) -> PublishedStore:
    return await KvStore.open(js, PUBLISHED_BUCKET, Published)


def span_attributes(obj: dict[str, Any]) -> dict[str, str | int]:
    meta = obj["metadata"]
    return {
        "k8s.namespace.name": str(meta.get("namespace", "")),
        "kaito.workspace.name": str(meta.get("name", "")),
        "kaito.workspace.uid": str(meta.get("uid", "")),
        "kaito.workspace.generation": int(meta.get("generation") or 0),
    }


def ref_of(obj: dict[str, Any]) -> WorkspaceRef:
    meta = obj["metadata"]
    return WorkspaceRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])


class Census:
    """Workspaces by ``status.state`` for ``kaiten_workspaces``: every state KAITO knows is exported,
    with 0 when none is in it, so a dashboard's series do not vanish."""

    STATES = (*get_args(WorkspaceState), "None")

    def __init__(self) -> None:
        self._state: dict[str, str] = {}

    def relisted(self, items: list[dict[str, Any]]) -> None:
        self._state = {}  # what a relist no longer shows is gone, even if its DELETED event was missed
        for obj in items:
            self.seen(obj, export=False)
        self._export()

    def seen(self, obj: dict[str, Any], *, export: bool = True) -> None:
        self._state[obj["metadata"]["uid"]] = str((obj.get("status") or {}).get("state"))
        if export:
            self._export()

    def gone(self, uid: str) -> None:
        self._state.pop(uid, None)
        self._export()

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.STATES, 0)
        for state in self._state.values():
            counts[state] = counts.get(state, 0) + 1
        return counts

    def _export(self) -> None:
        for state, count in self.counts().items():
            WORKSPACES.labels(state).set(count)


class WorkspaceWatcher:
    """The watch loop (run as a lifecycle ``LoopComponent``)."""

    def __init__(
        self,
        *,
        workspaces: Workspaces,
        publisher: Publisher,
        store: PublishedStore,
        settings: WatcherSettings,
        seen: Seen | None = None,
    ) -> None:
        self._workspaces = workspaces
        self._seen = seen if seen is not None else Seen()  # shared with the status writer
        self._publisher = publisher
        self._store = store
        self._settings = settings
        self.census = Census()

    # --- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                resource_version = await self._relist()
                await self._watch(resource_version, until=time.monotonic() + self._settings.resync_period_s)
                failures = 0
            except ApiException as exc:
                if exc.status == 410:
                    log.info("watch expired (410 Gone); relisting")
                    continue
                failures += 1
                await self._pause(failures, f"apiserver: HTTP {exc.status} {exc.reason}")
            except Exception as exc:  # NATS or apiserver unreachable, or a bad response: relist later
                failures += 1
                await self._pause(failures, repr(exc))

    async def _pause(self, failures: int, why: str) -> None:
        wait = delay_for(failures, base=0.5, cap=30.0, key="watcher")
        log.warning("watch loop failed (attempt %d): %s; relisting in %.1fs", failures, why, wait)
        await asyncio.sleep(wait)

    async def _relist(self) -> str:
        # records of Workspaces gone while no watcher acted (a crash, a takeover) go with this pass:
        # what was recorded before the list and is not in it is gone (uids are never reused). Only when
        # watching every namespace: a watcher of one namespace cannot tell another's records from gone.
        sweep = not self._settings.namespace
        recorded = set(await self._store.keys()) if sweep else set()
        listing = await self._workspaces.list_all(self._settings.namespace or None)
        self.census.relisted(listing.get("items", []))
        self._seen.relisted(listing.get("items", []))
        for uid in recorded - {obj["metadata"]["uid"] for obj in listing.get("items", [])}:
            await self._store.purge(uid)
        for obj in listing.get("items", []):
            await self._isolated(obj)
        return str(listing["metadata"]["resourceVersion"])

    async def _watch(self, resource_version: str, *, until: float) -> None:
        stream = self._workspaces.watch(
            self._settings.namespace or None,
            resource_version=resource_version,
            timeout_seconds=self._settings.watch_timeout_s,
        )
        try:
            while time.monotonic() < until:
                try:
                    event = await next_event(stream, self._settings.inactivity_timeout_s)
                except StopAsyncIteration:
                    return  # server-side timeout: relist (cheap, and repairs anything missed)
                except TimeoutError:
                    log.info("no watch events for %.0fs; rewatching", self._settings.inactivity_timeout_s)
                    return
                await self._on_event(event)
        finally:
            await stream.close()

    async def _on_event(self, event: dict[str, Any]) -> None:
        kind, obj = event["type"], event.get("raw_object") or event.get("object")
        if kind == "BOOKMARK" or not isinstance(obj, dict):
            return
        if kind == "DELETED":
            self._seen.gone(obj)
            self.census.gone(obj["metadata"]["uid"])
            await self._store.purge(obj["metadata"]["uid"])
            logs.of(log, ref_of(obj)).info("gone")
            return
        self.census.seen(obj)
        self._seen.saw(obj)
        await self._isolated(obj)

    async def _isolated(self, obj: dict[str, Any]) -> None:
        """Reconcile one Workspace; a failure that is about this object alone (its spec does not fit on
        the bus, the apiserver refuses its finalizer) is reported on it, and the loop goes on with the
        others. Anything else (NATS or the apiserver away) still stops the pass: it relists later."""
        generation = int(obj["metadata"].get("generation") or 0)
        try:
            with logs.about(ref_of(obj), generation=generation):
                await self.reconcile(obj)
        except InvalidInput as exc:
            await self._report(obj, exc.reason, str(exc))
        except ApiException as exc:
            if exc.status not in OBJECT_ERRORS:
                raise
            await self._report(obj, "FinalizerRefused", f"adding the finalizer: {classify(exc, 'patch')}")

    async def _report(self, obj: dict[str, Any], reason: str, message: str) -> None:
        ref = ref_of(obj)
        logs.of(log, ref).error("%s: %s", reason, message)
        await self._publisher.publish(
            ConditionReported(
                workspace=ref,
                generation=int(obj["metadata"].get("generation") or 0),
                type="WorkspaceSucceeded",
                status="False",
                reason=reason,
                message=message[:1000],
                warning=True,
                reporter="watcher",
            )
        )

    # --- one object -----------------------------------------------------------------------------

    async def reconcile(self, obj: dict[str, Any]) -> None:
        ref = ref_of(obj)
        published = await self._store.get(ref.uid) or Published()
        for action in decide(obj, published):
            if action is Action.ADD_FINALIZER:
                await self._add_finalizer(obj)
            elif action is Action.PUBLISH_OBSERVED:
                with telemetry.span("workspace observe", **span_attributes(obj)):  # the trace's root
                    await self._publish_observed(obj, ref)
                published = Published(generation=int(obj["metadata"]["generation"]), deleting=False)
                await self._store.put(ref.uid, published)
            elif action is Action.PUBLISH_DELETING:
                generation = int(obj["metadata"].get("generation") or 0)
                with telemetry.span("workspace delete", **span_attributes(obj)):
                    await self._publisher.publish(WorkspaceDeleting(workspace=ref, generation=generation))
                logs.of(log, ref).info("deleting (uid %s)", ref.uid)
                published = Published(generation=published.generation, deleting=True)
                await self._store.put(ref.uid, published)

    async def _publish_observed(self, obj: dict[str, Any], ref: WorkspaceRef) -> None:
        event = WorkspaceObserved(
            workspace=ref,
            generation=int(obj["metadata"]["generation"]),
            api_version=str(obj.get("apiVersion", "")),
            spec=typed_spec(obj),
            annotations={
                k: v
                for k, v in (obj["metadata"].get("annotations") or {}).items()
                if k != "kubectl.kubernetes.io/last-applied-configuration"  # the whole object again
            },
        )
        await self._publisher.publish(event)
        logs.of(log, ref).info("observed generation %d (uid %s)", event.generation, ref.uid)

    async def _add_finalizer(self, obj: dict[str, Any]) -> None:
        finalizers = [*(obj["metadata"].get("finalizers") or []), FINALIZER]
        try:
            self._seen.saw(await self._workspaces.patch_finalizers(obj, finalizers))
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone, or changed meanwhile: the next event decides again
                raise
