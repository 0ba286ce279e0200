"""The provider interface and what it is asked and answers.

A provider is level-triggered and idempotent: :meth:`Provider.ensure` is called again and again with
the same :class:`NodeRequest` (on every reconcile pass, after a restart, from a second replica) and
must converge on the requested nodes without ever creating twice — names derive from the Workspace's
uid, never from a counter or a clock. :meth:`Provider.release` likewise, until nothing is left.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Protocol

import msgspec

from shared.api.workspace import NODE_IMAGE_FAMILIES, NODE_IMAGE_FAMILY_ANNOTATION
from shared.events import WorkspaceRef

WORKSPACE_LABEL = "kaito.sh/workspace"
WORKSPACE_NAMESPACE_LABEL = "kaito.sh/workspacenamespace"
GPU_TAINT = {"key": "sku", "value": "gpu", "effect": "NoSchedule"}


def node_image_family(annotations: dict[str, str]) -> str:
    """The Workspace's node image family, normalised as KAITO does; "" when unset or not one KAITO
    knows (KAITO's webhook refuses those; without it, KAITO's NodeClaim code ignores them, as here)."""
    value = annotations.get(NODE_IMAGE_FAMILY_ANNOTATION, "").strip().lower()
    return value if value in NODE_IMAGE_FAMILIES else ""


class NodeRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the plan asks of the provider for one Workspace generation."""

    workspace: WorkspaceRef
    generation: int
    instance_type: str  # the plan's SKU ("local" on the local machine)
    count: int  # nodes
    gpus_per_node: int = 0
    labels: dict[str, str] = {}  # the labelSelector's matchLabels: new nodes carry them
    selector: dict[str, object] = {}  # the full labelSelector (bring-your-own matching)
    preferred_nodes: tuple[str, ...] = ()
    byo_nodes: tuple[str, ...] = ()  # nodes the planner found suitable, preferred first
    gpu_memory: int = 0  # bytes per GPU the plan needs a node to have (bring-your-own checks)
    image_family: str = ""  # "ubuntu" | "azurelinux" | "" (the provider's default): node_image_family

    @property
    def node_labels(self) -> dict[str, str]:
        """Labels on nodes we create: the selector's, plus which Workspace they belong to."""
        return {
            **self.labels,
            WORKSPACE_LABEL: self.workspace.name,
            WORKSPACE_NAMESPACE_LABEL: self.workspace.namespace,
        }


State = Literal["pending", "ready", "failed"]


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    state: State
    nodes: tuple[str, ...] = ()  # ready nodes (names), in a stable order
    reason: str = ""  # CamelCase, for a condition
    message: str = ""  # what a user reads in kubectl describe


class Provider(Protocol):
    name: str
    condition: str  # a finer condition it reports besides NodesReady ("NodeClaimReady"), or ""

    async def ensure(self, request: NodeRequest) -> Progress:
        """Create or resize towards the request (idempotent); report where things stand."""
        ...

    async def release(self, workspace: WorkspaceRef) -> bool:
        """Delete what was created for the Workspace (idempotent). True once nothing is left."""
        ...

    async def close(self) -> None: ...


class ProviderError(Exception):
    """Permanent: retrying cannot help (quota, unknown SKU, bad credentials). Goes to status as is."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def short_id(workspace: WorkspaceRef, length: int = 8) -> str:
    """A stable, lowercase-alphanumeric id for the Workspace (its uid, so a recreated namesake differs)."""
    digest = hashlib.sha256(f"{workspace.namespace}/{workspace.name}/{workspace.uid}".encode()).hexdigest()
    return digest[:length]
