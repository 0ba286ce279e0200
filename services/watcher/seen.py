"""The newest copy of each Workspace this process has seen: from its watch, and from its own writes.

The status writer reads a Workspace here instead of GETting it before each patch (about eight patches
per Workspace over its life, each of which used to cost a GET too). A copy that is stale costs one 409
and a GET, never a wrong write: every patch carries the resourceVersion it was computed from. (The one
change that may write nothing yet must act, a delete's, is checked against a copy that shows the
delete; the writer reads the object when its copy does not.) It is
controller-runtime's cached client, for the one kind the watcher already watches.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def _newer(obj: Obj, than: Obj) -> bool:
    """Whether ``obj`` is a later version than ``than`` (of the same object, or of one deleted and
    created again under its name). Kubernetes calls resourceVersions opaque; the etcd-backed
    apiserver's are cluster-wide revisions, which order. Anything else counts as newer (the worst a
    wrong guess does is a 409)."""
    mine, theirs = obj["metadata"].get("resourceVersion", ""), than["metadata"].get("resourceVersion", "")
    if mine.isdigit() and theirs.isdigit():
        return int(mine) >= int(theirs)
    return True


class Seen:
    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], Obj] = {}

    def get(self, namespace: str, name: str, uid: str) -> Obj | None:
        """The newest copy of that Workspace, if it is this uid's; else None (read it from the apiserver)."""
        obj = self._objects.get((namespace, name))
        return obj if obj is not None and obj["metadata"].get("uid") == uid else None

    def saw(self, obj: Obj) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        known = self._objects.get(key)
        if known is None or _newer(obj, known):  # a late response about an older object: not kept
            self._objects[key] = obj

    def gone(self, obj: Obj) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        known = self._objects.get(key)
        if known is not None and known["metadata"].get("uid") == meta.get("uid"):
            del self._objects[key]

    def relisted(self, items: list[Obj]) -> None:
        """A fresh list: what it no longer shows is gone (its DELETED event may have been missed)."""
        listed = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in items}
        self._objects = {key: obj for key, obj in self._objects.items() if key in listed}
        for obj in items:
            self.saw(obj)
