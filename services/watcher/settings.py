"""Watcher settings (environment ``KAITEN_*``)."""

from __future__ import annotations

from pydantic import field_validator

from shared.settings import ServiceSettings

# Who keeps state outside the Workspace's namespace that must go before the Workspace may: node pools
# and NodeClaims (provisioner), Ray objects and jobs (workload).
CLEANUP_OWNERS = ("provisioner", "workload")


class WatcherSettings(ServiceSettings):
    namespace: str = ""  # empty: all namespaces
    resync_period_s: float = 300.0  # relist everything this often to repair anything a watch missed
    watch_timeout_s: int = 240  # server-side watch timeout; a fresh watch resumes from resourceVersion
    inactivity_timeout_s: float = 300.0  # no event (not even a bookmark) for this long: rewatch
    # Owners of external state that must report CleanupDone before the finalizer goes: all of them
    # unless a deployment narrows it deliberately (KAITEN_CLEANUP_OWNERS="" waits for none).
    cleanup_owners: tuple[str, ...] = CLEANUP_OWNERS
    status_coalesce_batch: int = 64  # status events of one Workspace folded into one patch

    @field_validator("cleanup_owners")
    @classmethod
    def _known_owners(cls, owners: tuple[str, ...]) -> tuple[str, ...]:
        for owner in owners:  # a typo would hold every finalizer for ever
            if owner not in CLEANUP_OWNERS:
                raise ValueError(f"unknown cleanup owner {owner!r}: choose from {', '.join(CLEANUP_OWNERS)}")
        return owners
