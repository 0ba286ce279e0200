"""Start and stop the subprocesses we own, by PID (never by name)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it: never a fixed port)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different ports that were free a moment ago.

    One program given several ports needs them all different, and ``free_port()`` called twice may
    return the same port twice (the OS hands out a port again once its socket is closed: measured 8
    repeats in 20,000 groups of four). All sockets stay bound until every port is chosen."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def descendants(pid: int) -> set[int]:
    """PIDs of every process below ``pid`` (children, grandchildren, ...), read from ``ps``."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies, which only await their parent, are not)."""
    out = subprocess.run(["ps", "-eo", "pid=,stat="], capture_output=True, text=True, check=True).stdout
    live = {int(pid) for pid, stat in (line.split() for line in out.splitlines()) if not stat.startswith("Z")}
    return pids & live


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after "pid (comm) ": [0] is the state (field 3), [19] the start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def identity(pid: int) -> str | None:
    """Which process ``pid`` is: this boot's id and the process's start time (clock ticks since boot,
    from /proc/<pid>/stat). A PID reused after a reboot, or by a later process, has another identity."""
    fields = _stat(pid)
    return f"{_boot_id()}:{fields[19]}" if fields else None


def state(pid: int) -> str | None:
    """The process's state letter (``R``, ``S``, ``T`` stopped, ``Z`` …), or None when it is gone."""
    fields = _stat(pid)
    return fields[0] if fields else None


@functools.cache
def _boot_id() -> str:
    """This boot's id: read once (the supervisor asks for every PID on every status write)."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold the Python handlers of the stop signals while a child is started and its ``Popen`` kept;
    a signal that came meanwhile is raised again once the block is left.

    A handler that raises (the ``kaiten up`` supervisor's stop) could otherwise fire after the fork
    and before ``Popen`` returns: the child runs on, its PID known to no one (measured: 340 of 1,575
    starts under a SIGTERM every 0.5-4 ms). Handlers run only in the main thread, and only it may swap
    them; another thread's start is not interrupted by them anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    held = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    held = {sig: handler for sig, handler in held.items() if callable(handler)}
    for sig in held:
        signal.signal(sig, lambda signum, _frame: came.append(signum))
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(came):
            signal.raise_signal(signum)


def wait_until(done: Callable[[], bool], seconds: float, interval: float = 0.1) -> bool:
    """Poll ``done()`` every ``interval`` s for at most ``seconds`` s; whether it came true."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def kill_pids(pids: set[int]) -> None:
    """SIGKILL processes we started (by PID), ignoring those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class StartFailed(RuntimeError):
    """A component did not come up; the message carries the end of its log."""


@dataclass
class ManagedProcess:
    """One child process in its own session, logging to ``log_path``; stopped by its PID."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log, stop_signals_held():
            self.proc = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fail(self, what: str) -> StartFailed:
        code = self.proc.poll() if self.proc else None
        state = f"exited with {code}" if code is not None else "still running"
        return StartFailed(
            f"{self.name} {what} ({state}); last log lines from {self.log_path}:\n{tail(self.log_path)}"
        )

    def wait_ready(
        self, probe: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05
    ) -> None:
        """Poll ``probe()`` until it passes; raise :meth:`fail` if the process dies or ``timeout`` s pass."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if probe():
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(interval)
        raise self.fail(what)

    def stop(self, timeout: float = 10.0, *, group: bool = True) -> bool:
        """SIGTERM the process group we created (or, ``group=False``, only the leader, for a process
        that stops its own children in order), then SIGKILL the group after ``timeout`` s.

        Returns True when it stopped gracefully (or had already exited), False when it had to be killed.
        """
        if self.proc is None or self.proc.poll() is not None:
            return True
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.proc.pid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
            return False
        return True
