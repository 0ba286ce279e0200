"""The chaos suite's table: each scenario adds a row; it is printed at the end of the run (green or red),
so every CI log carries it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

HEADER = ("scenario", "Workspaces", "converged", "duplicates", "lost", "seconds")


@dataclass
class Row:
    scenario: str
    workspaces: int | str  # or what stands for them (requests, for the serving scenario)
    converged: int
    duplicates: int
    lost: int
    seconds: float

    def cells(self) -> tuple[str, ...]:
        return (self.scenario, str(self.workspaces), str(self.converged), str(self.duplicates),
                str(self.lost), f"{self.seconds:.1f}")  # fmt: skip


ROWS: list[Row] = []


@pytest.fixture
def table() -> list[Row]:
    return ROWS


def render(rows: list[Row]) -> str:
    cells = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(HEADER))).rstrip() for c in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ROWS:
        terminalreporter.write_sep("=", "chaos suite (issue 16)")
        terminalreporter.write_line(render(ROWS))
