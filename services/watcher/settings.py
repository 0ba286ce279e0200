"""Watcher settings (environment ``KAITEN_*``)."""

from __future__ import annotations

from pydantic import Field, field_validator

from shared.settings import ServiceSettings

# Who keeps state outside the Workspace's namespace that must go before the Workspace may: node pools
# and NodeClaims (provisioner), Ray objects and jobs (workload).
CLEANUP_OWNERS = ("provisioner", "workload")


class WatcherSettings(ServiceSettings):
    namespace: str = Field("", description="Watch this namespace only. Empty: all namespaces.")
    resync_period_s: float = Field(
        300.0, description="Seconds between relists of everything, to repair anything a watch missed."
    )
    watch_timeout_s: int = Field(
        240,
        description="The server-side watch timeout (seconds); a fresh watch resumes from resourceVersion.",
    )
    inactivity_timeout_s: float = Field(
        300.0, description="Seconds without any event (not even a bookmark) after which to watch again."
    )
    cleanup_owners: tuple[str, ...] = Field(
        CLEANUP_OWNERS,
        description="Owners of external state that must report CleanupDone before the finalizer goes: "
        "all of them unless a deployment narrows it deliberately (empty waits for none).",
    )
    status_coalesce_batch: int = Field(
        64, description="Status events of one Workspace folded into one patch."
    )

    @field_validator("cleanup_owners")
    @classmethod
    def _known_owners(cls, owners: tuple[str, ...]) -> tuple[str, ...]:
        for owner in owners:  # a typo would hold every finalizer for ever
            if owner not in CLEANUP_OWNERS:
                raise ValueError(f"unknown cleanup owner {owner!r}: choose from {', '.join(CLEANUP_OWNERS)}")
        return owners
