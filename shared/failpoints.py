"""Failpoints: named places where a test may make a service die or freeze on the spot
(``KAITEN_FAILPOINT=<name>`` or ``<name>=<action>``).

``reached("provisioner.settled")`` does nothing unless the environment names that point. Actions:

- ``exit`` (the default): the process exits at once with 137, as a SIGKILL would leave it: no
  cleanup, no flush. Tests use it to prove that a crash between two writes loses nothing.
- ``stop``: the process sends itself SIGSTOP, the first time only, as a replica frozen by the kernel, a
  full node or a debugger would be; the test resumes it with SIGCONT. Tests use it to prove that a
  frozen replica's stale work cannot undo what another replica did meanwhile.

Issue 16. Never set in a deployment.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)
ENV = "KAITEN_FAILPOINT"
_stopped: set[str] = set()


def reached(name: str) -> None:
    point, _, action = os.environ.get(ENV, "").partition("=")
    if point != name:
        return
    if action in ("", "exit"):
        log.error("failpoint %s: exiting now, as a SIGKILL would", name)
        logging.shutdown()
        os._exit(137)
    if action == "stop" and name not in _stopped:
        _stopped.add(name)
        log.error("failpoint %s: stopping (SIGSTOP) until continued", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
        log.warning("failpoint %s: continued", name)
