"""``go build`` with a progress bar: what a cold ``make up`` spends most of its time on.

The bar counts packages: ``go list -deps`` gives how many the binaries need, ``go build -v`` names each
one as it compiles it. The estimate is the rate so far (shown once a tenth is done), not a constant. On
a terminal the bar redraws one line; in a log it prints a line every tenth. Standard library only: the
Makefile runs this while pip is still installing the project's dependencies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO


class BuildFailed(RuntimeError):
    pass


def binary_name(package: str) -> str:
    """What ``go build -o DIR/`` names a main package's binary: its last path element, or the one before
    a major-version suffix (``go.etcd.io/etcd/server/v3`` → ``server``)."""
    parts = package.rstrip("/").split("/")
    last = parts[-1]
    # Go's isVersionElement: v2, v3, … (not v0, v1, or a leading zero)
    if len(parts) > 1 and last[:1] == "v" and last[1:].isdigit() and last[1] != "0" and last != "v1":
        return parts[-2]
    return last


class Progress:
    """One build's progress: ``advance()`` per package compiled; draws itself on ``out``."""

    def __init__(self, label: str, total: int, out: TextIO, *, tty: bool | None = None) -> None:
        self.label, self.total, self.out = label, max(total, 1), out
        self.tty = out.isatty() if tty is None else tty
        self.done = 0
        self.started = time.monotonic()
        self._printed_tenth = 0

    def eta(self) -> float | None:
        """Seconds left at the rate so far; None until a tenth is done (early packages are small)."""
        if self.done * 10 < self.total:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.done * (self.total - min(self.done, self.total))

    def line(self) -> str:
        share = min(self.done, self.total) / self.total
        bar = "#" * int(share * 30)
        eta = self.eta()
        left = f", ~{_clock(eta)} left" if eta is not None else ""
        elapsed = _clock(time.monotonic() - self.started)
        return f"{self.label} [{bar:<30}] {share:4.0%} {self.done}/{self.total} packages, {elapsed}{left}"

    def advance(self) -> None:
        self.done += 1
        if self.tty:
            self.out.write("\r" + self.line() + "\033[K")
            self.out.flush()
        elif (tenth := min(self.done, self.total) * 10 // self.total) > self._printed_tenth:
            self._printed_tenth = tenth
            print(self.line(), file=self.out, flush=True)

    def finish(self, message: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        print(message, file=self.out, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def build(
    packages: dict[str, str],
    out_dir: Path,
    *,
    cwd: Path,
    env: dict[str, str],
    ldflags: str,
    label: str,
    out: TextIO = sys.stderr,
) -> dict[str, Path]:
    """Build ``{name: main package}`` in one ``go build`` (their shared packages compile once, and one's
    link overlaps another's compile) into ``out_dir/<name>``; returns the paths."""
    if shutil.which("go") is None:
        raise BuildFailed(f"building the {label} needs Go (https://go.dev/dl) on PATH")
    pkgs = list(packages.values())
    print(f"{label}: resolving Go modules (a cold machine downloads ~0.6 GB first) ...", file=out, flush=True)
    listed = subprocess.run(
        ["go", "list", "-deps", *pkgs], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:
        raise BuildFailed(f"go list {' '.join(pkgs)} failed:\n{listed.stderr[-4000:]}")
    compiled = [pkg for pkg in listed.stdout.split() if pkg != "unsafe"]  # the one that is never compiled
    progress = Progress(label, len(compiled), out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))  # its own: two builds at once do not clash
    try:
        proc = subprocess.Popen(
            ["go", "build", "-v", "-trimpath", f"-ldflags={ldflags}", "-o", f"{tmp}{os.sep}", *pkgs],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        errors: list[str] = []
        for line in proc.stderr:  # -v: one import path per package compiled; anything else is an error
            text = line.strip()
            if text and " " not in text and ":" not in text:
                progress.advance()
            elif text:
                errors.append(text)
        if proc.wait() != 0:
            if progress.tty:
                out.write("\n")  # the bar's line ends before the error
            raise BuildFailed(f"go build {' '.join(pkgs)} failed:\n" + "\n".join(errors)[-4000:])
        built = {}
        for name, pkg in packages.items():
            (tmp / binary_name(pkg)).rename(out_dir / name)
            built[name] = out_dir / name
    finally:  # whatever happened, no half build is left beside the binaries
        shutil.rmtree(tmp, ignore_errors=True)
    progress.finish(f"{label}: built {', '.join(packages)} in {_clock(time.monotonic() - progress.started)}")
    return built
