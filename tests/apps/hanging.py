"""A service whose one component never finishes stopping: what a hung shutdown step looks like
(tests/test_service_cli.py: the process still exits within its bound)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from shared.lifecycle import Component, Runtime, main
from shared.settings import ServiceSettings


class Hangs:
    name = "hangs"

    async def start(self) -> None:
        return None

    async def stop(self, grace: float) -> None:
        await asyncio.Event().wait()  # never set

    async def wait(self) -> None:
        await asyncio.Event().wait()


async def build(runtime: Runtime) -> Sequence[Component]:
    return [Hangs()]


if __name__ == "__main__":
    main("hanging", ServiceSettings, build, needs_kube=False)
