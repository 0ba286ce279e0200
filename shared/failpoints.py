"""Failpoints: named places where a test may make a service die on the spot (``KAITEN_FAILPOINT``).

``reached("provisioner.settled")`` does nothing unless the environment names that point; then the
process exits at once with 137, as a SIGKILL would leave it: no cleanup, no flush. Tests use it to
prove that a crash between two writes loses nothing (issue 16). Never set in a deployment.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
ENV = "KAITEN_FAILPOINT"


def reached(name: str) -> None:
    if os.environ.get(ENV) == name:
        log.error("failpoint %s: exiting now, as a SIGKILL would", name)
        logging.shutdown()
        os._exit(137)
