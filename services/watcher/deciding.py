"""What a Workspace change implies: a pure function, no I/O.

The watcher remembers, per uid, the last generation it published and whether it published
"deleting" (in NATS KV, so a restarted or second replica knows too). Given the object as the
apiserver shows it now, :func:`decide` says what to do. Label/annotation/status-only updates leave
``metadata.generation`` unchanged, so they imply nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from shared.api.crd import FINALIZER


class Action(Enum):
    ADD_FINALIZER = "add-finalizer"
    PUBLISH_OBSERVED = "publish-observed"
    PUBLISH_DELETING = "publish-deleting"


@dataclass(frozen=True)
class Published:
    generation: int = 0
    deleting: bool = False


def decide(obj: dict[str, Any], published: Published) -> list[Action]:
    meta = obj.get("metadata", {})
    ours = FINALIZER in (meta.get("finalizers") or [])
    if meta.get("deletionTimestamp"):
        return [Action.PUBLISH_DELETING] if ours and not published.deleting else []
    if not ours:
        # Nothing is published before the finalizer is in place, so nothing external can be created
        # for a Workspace that could then vanish without cleanup. The patch brings a new watch event.
        return [Action.ADD_FINALIZER]
    if int(meta.get("generation") or 0) > published.generation:
        return [Action.PUBLISH_OBSERVED]
    return []
