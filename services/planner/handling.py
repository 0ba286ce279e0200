"""The planner's consumer handler: observed generation → plan → KV + event; deleting → forget."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from services.planner import inference_config
from services.planner.hub import Hub
from services.planner.inference_config import InferenceConfig
from services.planner.planning import PlanOptions, plan, uses_existing_nodes
from services.planner.store import PlanStore, StoredPlan
from shared import events as ev
from shared import logs
from shared.api.workspace import ObjectMeta, Workspace
from shared.bus.kvstore import key_of
from shared.bus.publishing import Publisher
from shared.errors import InvalidInput
from shared.kube.errors import classify
from shared.planning.catalog import Catalogs
from shared.planning.hub import is_hub_id
from shared.planning.inventory import selector_query
from shared.planning.model import NodeInfo, Plan, Rejection

log = logging.getLogger(__name__)


class Planner:
    def __init__(
        self,
        *,
        catalogs: Catalogs,
        options: PlanOptions,
        store: PlanStore,
        publisher: Publisher,
        api: kclient.ApiClient | None,
        hub: Hub | None = None,
    ) -> None:
        self._catalogs = catalogs
        self._hub = hub
        self._options = options
        self._store = store
        self._publisher = publisher
        self._api = api
        self._core = kclient.CoreV1Api(api) if api is not None else None

    async def handle(self, events: Sequence[ev.AnyEvent]) -> None:
        last = events[-1]
        if isinstance(last, ev.WorkspaceDeleting):
            stored = await self._store.get(key_of(last.workspace))
            if stored is not None and stored.uid == last.workspace.uid:  # not a recreated namesake's
                await self._store.purge(key_of(last.workspace))
            return
        observed = [e for e in events if isinstance(e, ev.WorkspaceObserved)]
        if observed:
            await self._plan(max(observed, key=lambda e: e.generation))  # only the newest matters

    async def _plan(self, event: ev.WorkspaceObserved) -> None:
        ref = event.workspace
        stored = await self._store.get(key_of(ref))
        if stored is not None and stored.uid == ref.uid and stored.generation > event.generation:
            logs.of(log, ref).info(
                "generation %d is older than the planned %d: dropped",
                event.generation,
                stored.generation,
            )
            return
        workspace = self._workspace(event)
        inventory = (
            await self._inventory(workspace, ref) if uses_existing_nodes(workspace, self._options) else []
        )
        catalogs = await self._catalogs_for(workspace)
        config = await self._inference_config(workspace, ref)
        if isinstance(catalogs, Rejection):
            result: Plan | Rejection = catalogs
        elif isinstance(config, Rejection):
            result = config
        else:
            result = plan(workspace, catalogs, inventory, self._options, config)
            if isinstance(result, Plan) and catalogs is not self._catalogs and self._hub is not None:
                note = f"{result.model} is not in the catalog: sized from {self._hub.url} (its config.json "
                note += "and weight files)"
                result = msgspec.structs.replace(result, notes=(*result.notes, note))
        common: dict[str, Any] = {
            "workspace": ref,
            "generation": event.generation,
            "correlation_id": event.correlation_id or event.event_id,
        }
        if isinstance(result, Plan):
            stored = StoredPlan(uid=ref.uid, generation=event.generation, plan=result)
            await self._store.put(key_of(ref), stored)
            await self._publisher.publish(
                ev.PlanResolved(
                    plan=result,
                    explanation=result.explanation,
                    api_version=event.api_version,
                    spec=event.spec,
                    annotations=event.annotations,
                    **common,
                )
            )
            logs.of(log, ref).info("gen %d: %s — %s", event.generation, result.summary(), result.explanation)
        else:
            await self._store.put(
                key_of(ref),
                StoredPlan(
                    uid=ref.uid, generation=event.generation, reason=result.reason, message=result.message
                ),
            )
            await self._publisher.publish(
                ev.PlanRejected(reason=result.reason, message=result.message, **common)
            )
            logs.of(log, ref).info("gen %d rejected: %s: %s", event.generation, result.reason, result.message)

    def _workspace(self, event: ev.WorkspaceObserved) -> Workspace:
        ref = event.workspace
        metadata = ObjectMeta(
            name=ref.name, namespace=ref.namespace, uid=ref.uid, generation=event.generation
        )
        try:
            return Workspace.of(event.spec, api_version=event.api_version, metadata=metadata)
        except ValidationError as exc:  # only an apiVersion this planner does not know
            raise InvalidInput(f"cannot be planned: {exc.errors()[0]['msg']}", reason="InvalidSpec") from exc

    async def _catalogs_for(self, workspace: Workspace) -> Catalogs | Rejection:
        """The catalogs, with the preset the hub describes when the Workspace names a Hugging Face id
        the catalog does not hold (KAITO's "any HF model" presets)."""
        section = workspace.tuning if workspace.tuning is not None else workspace.inference
        name = section.preset.name if section is not None and section.preset is not None else ""
        if self._hub is None or not is_hub_id(name) or self._catalogs.resolve_preset(name) is not None:
            return self._catalogs
        found = await self._hub.preset(name.strip())
        return found if isinstance(found, Rejection) else self._catalogs.with_preset(found)

    async def _inference_config(
        self, workspace: Workspace, ref: ev.WorkspaceRef
    ) -> InferenceConfig | Rejection | None:
        """The ConfigMap named by ``inference.config``, read each time the Workspace is planned."""
        name = workspace.inference.config if workspace.inference is not None else None
        if not name:
            return None
        if self._core is None:
            return Rejection(
                reason=inference_config.REASON,
                message=f"inference.config {name}: this planner runs without a Kubernetes API to read it",
            )
        try:
            found = await self._core.read_namespaced_config_map(name, ref.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise classify(exc, f"[{ref.key}] read ConfigMap {name}") from exc
            return inference_config.parse(name, ref.namespace, None)
        return inference_config.parse(name, ref.namespace, dict(found.data or {}))

    async def _inventory(self, workspace: Workspace, ref: ev.WorkspaceRef) -> list[NodeInfo]:
        if self._core is None or self._api is None:
            return []
        try:
            nodes = await self._core.list_node(
                label_selector=selector_query(workspace.resource.label_selector)
            )
        except ApiException as exc:
            raise classify(exc, f"[{ref.key}] list nodes") from exc
        return [NodeInfo.from_node(self._api.sanitize_for_serialization(n)) for n in nodes.items]
