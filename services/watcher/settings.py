"""Watcher settings (environment ``KAITEN_*``)."""

from __future__ import annotations

from shared.settings import ServiceSettings


class WatcherSettings(ServiceSettings):
    namespace: str = ""  # empty: all namespaces
    resync_period_s: float = 300.0  # relist everything this often to repair anything a watch missed
    watch_timeout_s: int = 240  # server-side watch timeout; a fresh watch resumes from resourceVersion
    inactivity_timeout_s: float = 300.0  # no event (not even a bookmark) for this long: rewatch
    # Owners of external state that must report CleanupDone before the finalizer goes. Empty until
    # the provisioner and workload exist (later issues add "provisioner", "workload").
    cleanup_owners: tuple[str, ...] = ()
    status_coalesce_batch: int = 64  # status events of one Workspace folded into one patch
