"""The one interface both backends implement (``local``: the Ray cluster of ``kaiten up``; ``kuberay``:
RayService / RayJob objects in the cluster). Everything is keyed and named from the Workspace, so every
call is idempotent: redelivery, restarts and a second replica converge on the same objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from shared.api.workspace import Workspace
from shared.events import WorkspaceRef
from shared.planning.model import Plan

State = Literal["pending", "ready", "failed", "absent"]
JobState = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED", "ABSENT"]


@dataclass(frozen=True)
class Target:
    """One generation of one Workspace, as a backend sees it."""

    ref: WorkspaceRef
    api_version: str
    generation: int
    workspace: Workspace | None = None  # present for deploy / submit
    plan: Plan | None = None
    job: str = ""  # the Ray job submission id of a tuning Workspace
    template: bool = False  # inference from the Workspace's own pod template, not a preset


class Backend(Protocol):
    name: str

    async def deploy(self, target: Target, config: dict[str, Any]) -> None:
        """Run (or roll to) this serving config; ``config`` names adapter pull Secrets by name."""
        ...

    async def deploy_template(self, target: Target) -> None:
        """Run the Workspace's own pod template on its nodes, as KAITO does (``target.template``);
        refused with a ``RenderError`` where the backend cannot run pods."""
        ...

    async def status(self, target: Target) -> tuple[State, str]:
        """The deployment's state for ``target.generation`` and a message (why it failed / where it is)."""
        ...

    def endpoint(self, target: Target) -> str: ...

    async def submit(self, target: Target, sections: dict[str, Any]) -> None:
        """Start the tuning job ``target.job`` (KAITO's config ``sections``); idempotent by that id."""
        ...

    async def job_status(self, target: Target) -> tuple[JobState, str]: ...

    async def remove(self, target: Target) -> bool:
        """Remove everything of this Workspace; True once it is all gone."""
        ...

    async def close(self) -> None: ...
