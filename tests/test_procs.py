"""``kaiten.local.procs``: the processes we start are the processes we know.

The ``kaiten up`` supervisor stops on SIGTERM by raising from its signal handler, wherever it is. A CI
run left a whole Ray head running after a Ctrl-C during ``kaiten up``: the signal had come while the
supervisor was inside ``subprocess.Popen``, after the fork, so the child ran on with its PID known to no
one, and the orderly stop had nothing to stop."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

SPAWNER = textwrap.dedent("""
    import json, os, random, signal, sys, threading, time
    from pathlib import Path
    from kaiten.local.procs import ManagedProcess, descendants, kill_pids, running

    class Stop(Exception):
        pass

    def stop(*_):  # the supervisor's handler raises wherever it finds us; here: within a start
        if armed:
            raise Stop

    armed = False
    signal.signal(signal.SIGTERM, stop)
    started, interrupted = [], 0

    def pester():  # a stop signal every 0.5-4 ms, as from an impatient user, for 3 s
        end = time.monotonic() + 3
        while time.monotonic() < end:
            time.sleep(random.uniform(0.0005, 0.004))
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=pester, daemon=True)
    thread.start()
    while thread.is_alive():
        proc = ManagedProcess(name="sleep", argv=["sleep", "60"], log_path=Path(sys.argv[1]))
        started.append(proc)  # as the supervisor keeps its parts: what it will stop
        try:
            armed = True
            proc.start()
        except Stop:
            interrupted += 1
        finally:
            armed = False
    recorded = {proc.pid for proc in started if proc.proc is not None}
    children = running(descendants(os.getpid()))  # not the ps that listed them
    print(json.dumps({"started": len(recorded), "interrupted": interrupted,
                      "unknown": len(children - recorded)}))
    kill_pids(children)
""")


@pytest.mark.timeout(60)
def test_a_stop_signal_during_a_start_never_leaves_an_unknown_child(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SPAWNER, str(tmp_path / "log")], cwd=REPO, capture_output=True, text=True,
        timeout=50,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    counts = json.loads(out.splitlines()[-1])
    print(counts)
    assert counts["interrupted"] > 0 and counts["started"] > 0, counts  # the signal did land mid-start
    assert counts["unknown"] == 0, f"children started but not recorded: {counts}"


def test_a_stop_signal_during_a_servers_start_leaves_it_known(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The same for the servers ``kaiten up`` starts: each keeps its process before starting it, so the
    stop signal re-raised at the end of the start finds it. A CI run's Ctrl-C during ``kaiten up`` left
    a Ray head running: ``RayHead.process`` was assigned only once ``start()`` had returned (NatsServer,
    the control plane and the node were alike)."""
    import os
    import signal

    from kaiten.local.nats_server import NatsServer

    class Stop(Exception):
        pass

    def raise_stop(*_: object) -> None:
        raise Stop

    real = subprocess.Popen

    def popen_then_ctrl_c(*args, **kwargs):  # type: ignore[no-untyped-def]
        child = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the user's stop, arriving as the child starts
        return child

    server = NatsServer(tmp_path / "nats")
    previous = signal.signal(signal.SIGTERM, raise_stop)
    monkeypatch.setattr(subprocess, "Popen", popen_then_ctrl_c)
    try:
        with pytest.raises(Stop):
            server.start()
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, previous)
    process = getattr(server, "process", None)
    assert process is not None and process.alive(), "a started nats-server nobody knows of"
    assert process.stop(timeout=10) and not process.alive()
