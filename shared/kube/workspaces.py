"""Operations on Workspace objects through the apiserver (custom objects API)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from shared.api.crd import GROUP, KIND, PLURAL, STORAGE_VERSION

MERGE_PATCH = "application/merge-patch+json"
FIELD_MANAGER = "kaiten"
Obj = dict[str, Any]


class Workspaces:
    """Thin typed façade over CustomObjectsApi for ``workspaces.kaito.sh``."""

    def __init__(self, api: client.ApiClient, *, version: str = STORAGE_VERSION) -> None:
        self._objects = client.CustomObjectsApi(api)
        self._core = client.CoreV1Api(api)
        self.version = version

    async def list_all(self, namespace: str | None = None) -> Obj:
        if namespace:
            result = await self._objects.list_namespaced_custom_object(GROUP, self.version, namespace, PLURAL)
        else:
            result = await self._objects.list_cluster_custom_object(GROUP, self.version, PLURAL)
        return dict(result)

    def watch(self, namespace: str | None, *, resource_version: str, timeout_seconds: int) -> watch.Watch:
        """A watch stream from ``resource_version``; the caller must ``await stream.close()``."""
        common = {
            "resource_version": resource_version,
            "allow_watch_bookmarks": True,
            "timeout_seconds": timeout_seconds,
        }
        if namespace:
            return watch.Watch().stream(
                self._objects.list_namespaced_custom_object, GROUP, self.version, namespace, PLURAL, **common
            )
        return watch.Watch().stream(
            self._objects.list_cluster_custom_object, GROUP, self.version, PLURAL, **common
        )

    async def get(self, namespace: str, name: str) -> Obj | None:
        try:
            return dict(
                await self._objects.get_namespaced_custom_object(GROUP, self.version, namespace, PLURAL, name)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def patch(self, namespace: str, name: str, patch: Obj, *, status: bool = False) -> Obj:
        """A JSON merge patch of the object, or of ``/status`` with ``status=True``.

        Carry ``metadata.resourceVersion`` in ``patch`` for an optimistic-concurrency precondition.
        """
        method = (
            self._objects.patch_namespaced_custom_object_status
            if status
            else self._objects.patch_namespaced_custom_object
        )
        return dict(
            await method(
                GROUP,
                self.version,
                namespace,
                PLURAL,
                name,
                patch,  # type: ignore[call-arg]
                _content_type=MERGE_PATCH,
                field_manager=FIELD_MANAGER,
            )
        )

    async def patch_finalizers(self, obj: Obj, finalizers: list[str]) -> Obj:
        """Replace ``metadata.finalizers``, guarded by the resourceVersion ``obj`` was read at."""
        meta = obj["metadata"]
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        return await self.patch(meta["namespace"], meta["name"], patch)

    async def post_event(
        self,
        *,
        obj_ref: dict[str, str],
        name: str,
        event_type: str,
        reason: str,
        message: str,
        component: str,
    ) -> None:
        """A core/v1 Event on the Workspace; ``name`` is deterministic, so a redelivery is a no-op."""
        now = dt.datetime.now(dt.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=name, namespace=obj_ref["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{self.version}",
                kind=KIND,
                name=obj_ref["name"],
                namespace=obj_ref["namespace"],
                uid=obj_ref["uid"],
            ),
            type=event_type,
            reason=reason,
            message=message[:1024],
            source=client.V1EventSource(component=component),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            reporting_component=component,
            reporting_instance=component,
        )
        try:
            await self._core.create_namespaced_event(obj_ref["namespace"], body)
        except ApiException as exc:
            if exc.status != 409:
                raise
