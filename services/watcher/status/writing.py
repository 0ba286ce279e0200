"""Apply a folded :class:`StatusChange` to the Workspace: one status merge-patch per change.

Optimistic concurrency: each patch carries the resourceVersion it was computed from. The first try
computes it from the newest copy the watcher has seen (:class:`~services.watcher.seen.Seen`), not a GET;
a 409 means that copy was stale or someone wrote in between, so read it from the apiserver and
recompute (bounded). 404, or an object with another uid
(deleted and recreated under the same name), means the events are about something gone: drop them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from services.watcher.seen import Seen
from services.watcher.status.conditions import (
    StatusChange,
    finalizer_removable,
    fold,
    fresh,
    merge_conditions,
    workspace_state,
)
from shared import logs
from shared.api.crd import FINALIZER
from shared.errors import Transient
from shared.events import AnyEvent, WorkspaceRef
from shared.kube.errors import classify
from shared.kube.workspaces import Workspaces

log = logging.getLogger(__name__)
COMPONENT = "kaiten-status-writer"
CONFLICT_ATTEMPTS = 5


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_patch(obj: dict[str, Any], change: StatusChange, now: str) -> dict[str, Any] | None:
    """The merge patch for ``/status``, or None when the change changes nothing."""
    status = obj.get("status") or {}
    new: dict[str, Any] = {}
    seen = {k: int(v) for k, v in (status.get("conditionEventTimes") or {}).items()}
    updates, latest = fresh(change.conditions, seen)
    conditions = merge_conditions(status.get("conditions") or [], updates, now)
    if conditions != (status.get("conditions") or []):
        new["conditions"] = conditions
    state = workspace_state(conditions, tuning="tuning" in obj, previous=status.get("state"))
    if state != status.get("state"):
        new["state"] = state
    if latest != seen:
        new["conditionEventTimes"] = {k: v for k, v in latest.items() if seen.get(k) != v}
    if change.worker_nodes is not None and list(change.worker_nodes) != status.get("workerNodes"):
        new["workerNodes"] = list(change.worker_nodes)
    if change.plan is not None:
        current_gen = int((status.get("plan") or {}).get("observedGeneration") or 0)
        if change.plan["observedGeneration"] >= current_gen and change.plan != status.get("plan"):
            new["plan"] = change.plan
            new["targetNodeCount"] = change.plan["nodes"]
    cleaned = sorted(set(status.get("cleanedUpBy") or []) | change.cleaned_up_by)
    if cleaned != sorted(status.get("cleanedUpBy") or []):
        new["cleanedUpBy"] = cleaned
    if not new:
        return None
    return {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "status": new}


def _deleting(obj: dict[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def _cleaned(obj: dict[str, Any], change: StatusChange) -> set[str]:
    """The cleanup owners that have reported: stored, and in this change."""
    return set((obj.get("status") or {}).get("cleanedUpBy") or []) | change.cleaned_up_by


class StatusWriter:
    """The consumer handler: events of one Workspace, in order, possibly a burst of them."""

    def __init__(
        self, *, workspaces: Workspaces, cleanup_owners: Sequence[str], seen: Seen | None = None
    ) -> None:
        self._workspaces = workspaces
        self._owners = tuple(cleanup_owners)
        self._seen = seen if seen is not None else Seen()

    async def handle(self, events: Sequence[AnyEvent]) -> None:
        change = fold(events)
        ref = events[-1].workspace
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                await self._apply_once(ref, change, cached=attempt == 0)
                return
            except ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status != 409:
                    raise classify(exc, f"[{ref.key}] status") from exc
        raise Transient(f"[{ref.key}] status: still conflicting after {CONFLICT_ATTEMPTS} attempts")

    async def _apply_once(self, ref: WorkspaceRef, change: StatusChange, *, cached: bool) -> None:
        obj = self._seen.get(ref.namespace, ref.name, ref.uid) if cached else None
        if obj is not None and (change.deleting or change.cleaned_up_by) and not _deleting(obj):
            # the delete is older than this copy (another replica's watch saw it first): a change that
            # writes nothing would send no patch, so no 409 would show the copy is stale, and the
            # release it is due would be skipped for good
            obj = None
        if obj is None:
            obj = await self._workspaces.get(ref.namespace, ref.name)
        if obj is None or obj["metadata"].get("uid") != ref.uid:
            logs.of(log, ref).info(
                "gone (uid %s); dropping %d condition update(s)",
                ref.uid,
                len(change.conditions),
            )
            return
        self._seen.saw(obj)
        # the last cleanup report of a Workspace that goes once the finalizer is released: release it,
        # without first writing a status nobody will read
        patch = None if self._releasable(obj, change) else status_patch(obj, change, now_rfc3339())
        if patch is not None:
            obj = await self._workspaces.patch(ref.namespace, ref.name, patch, status=True)
            self._seen.saw(obj)
            logs.of(log, ref).info(
                "status: %s",
                ", ".join(f"{c.type}={c.status}" for c in change.conditions) or "cleanup progress",
            )
        for warning in change.warnings:
            name = f"{ref.name}.{hashlib.sha1(warning.dedupe.encode()).hexdigest()[:16]}"  # noqa: S324 - a name, not security
            await self._workspaces.post_event(
                obj_ref={"namespace": ref.namespace, "name": ref.name, "uid": ref.uid},
                name=name,
                event_type="Warning",
                reason=warning.reason,
                message=warning.message,
                component=COMPONENT,
            )
        await self._maybe_release(ref, obj, change)

    def _releasable(self, obj: dict[str, Any], change: StatusChange) -> bool:
        """Deleting, ours the only finalizer left, and every cleanup owner reported (with this change)."""
        return (
            _deleting(obj)
            and list(obj["metadata"].get("finalizers") or []) == [FINALIZER]
            and finalizer_removable(_cleaned(obj, change), self._owners)
        )

    async def _maybe_release(self, ref: WorkspaceRef, obj: dict[str, Any], change: StatusChange) -> None:
        finalizers = list(obj["metadata"].get("finalizers") or [])
        if not _deleting(obj) or FINALIZER not in finalizers:
            return
        cleaned = _cleaned(obj, change)
        if not finalizer_removable(cleaned, self._owners):
            logs.of(log, ref).info("waiting for cleanup by %s", sorted(set(self._owners) - set(cleaned)))
            return
        finalizers.remove(FINALIZER)
        released = await self._workspaces.patch_finalizers(obj, finalizers)
        if released["metadata"].get("finalizers"):
            self._seen.saw(released)
        else:
            self._seen.gone(released)  # it goes now: its DELETED event may already have been handled
        logs.of(log, ref).info("cleanup complete; finalizer removed")
