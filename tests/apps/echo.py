"""One replica that answers ``GET /`` with "ok": a Serve application with no model, to test Ray itself."""

from __future__ import annotations

from ray import serve
from starlette.requests import Request


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Echo:
    async def __call__(self, request: Request) -> str:
        return "ok"


app = Echo.bind()
