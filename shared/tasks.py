"""Stopping a task for certain.

On Python 3.11 ``asyncio.wait_for`` returns its result when a cancellation lands in the same loop
iteration as the result, and the cancellation is lost (CPython gh-86296, fixed in 3.12). nats-py awaits
every request with it (a publish's ack, a KV read, a fetch), so a task cancelled once may well run on: a
CI run's watcher did, published on, and ignored SIGTERM until it was killed. :func:`cancel_and_wait`
cancels again until the task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

RECANCEL_S = 1.0  # a task still running this long after a cancel is cancelled again (its cleanup included)


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and return once every one has ended, cancelling again (every ``RECANCEL_S``)
    any that runs on. What they raised is not raised here (ask each ``task.exception()``); it counts as
    retrieved, so asyncio does not log it again.

    Cancelled itself meanwhile (its caller re-cancelled by the same rule), it still waits for them to
    end, then raises the cancellation: a nested task is never left running."""
    pending = {task for task in tasks if not task.done()}
    cancelled = False
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
        except asyncio.CancelledError:
            cancelled = True
            pending = {task for task in pending if not task.done()}
    for task in tasks:
        retrieved(task)
    if cancelled:
        raise asyncio.CancelledError


def retrieved(task: asyncio.Future[Any]) -> None:
    """Mark what ``task`` raised as seen (a done-callback too): whoever needed it asked already."""
    if not task.cancelled():
        task.exception()


async def until_first_ends(*work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` together until one of them ends (returns or raises), then stop the others (as
    :func:`cancel_and_wait` does) and raise what the first raised."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(*tasks)
    for task in done:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc


async def finish(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` (a cleanup with a bound of its own) to its end even if this task is cancelled
    meanwhile, then raise the cancellation: a re-cancel by :func:`cancel_and_wait` must not cut short a
    consumer's stop (its in-flight work, its leases handed back)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = cancelled or not task.done()
    if cancelled:
        raise asyncio.CancelledError
    task.result()  # raises what it raised
