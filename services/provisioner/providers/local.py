"""``local``: the machine running ``kaiten up`` — one CPU node, always ready, nothing to create."""

from __future__ import annotations

import socket

from services.provisioner.providers.base import NodeRequest, Progress, ProviderError
from shared.events import WorkspaceRef


class LocalProvider:
    name = "local"
    condition = ""

    def __init__(self, node_name: str = "") -> None:
        self.node_name = node_name or socket.gethostname()

    async def ensure(self, request: NodeRequest) -> Progress:
        if request.count != 1 or request.gpus_per_node:
            # The planner never plans this for provider local; a hand-made or stale plan might.
            raise ProviderError(
                "LocalMachineOnly",
                f"the local provider has one CPU machine; the plan asks for {request.count} node(s)"
                f" with {request.gpus_per_node} GPU(s) each",
            )
        return Progress(state="ready", nodes=(self.node_name,), message="the local machine")

    async def release(self, workspace: WorkspaceRef) -> bool:
        return True

    async def close(self) -> None:
        return None
