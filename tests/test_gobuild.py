"""The control plane's build step (kaiten.local.gobuild) on a real, small Go module: two main packages in
one ``go build``, the progress bar counting the packages ``go build -v`` compiles, a failure's error."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from kaiten.local import gobuild

MAIN = 'package main\n\nimport "fmt"\n\nfunc main() {{ fmt.Println("{word}") }}\n'


def module(root: Path) -> Path:
    root.mkdir()
    (root / "go.mod").write_text("module example.test/m\n\ngo 1.21\n")
    for pkg, word in (("cmd/hello", "hello"), ("server/v3", "server")):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "main.go").write_text(MAIN.format(word=word))
    return root


def go_env(tmp_path: Path) -> dict[str, str]:
    # a fresh build cache: every package (the standard library's too) is compiled and counted
    return {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "", "GOCACHE": str(tmp_path / "gocache")}


def test_binary_names_follow_go_build() -> None:
    assert gobuild.binary_name("k8s.io/kubernetes/cmd/kube-apiserver") == "kube-apiserver"
    assert gobuild.binary_name("go.etcd.io/etcd/server/v3") == "server"
    assert gobuild.binary_name("example.test/vet") == "vet"
    for not_a_version in ("v1", "v0", "v01"):  # Go names these binaries by the element itself
        assert gobuild.binary_name(f"example.test/tool/{not_a_version}") == not_a_version


@pytest.mark.slow  # compiles the standard library (a fresh build cache)
@pytest.mark.timeout(300)
def test_two_binaries_in_one_build_with_a_progress_bar(tmp_path: Path) -> None:
    src = module(tmp_path / "src")
    out = io.StringIO()  # not a terminal: a line per tenth
    built = gobuild.build(
        {"hello": "example.test/m/cmd/hello", "etcd-like": "example.test/m/server/v3"},
        tmp_path / "bin",
        cwd=src,
        env=go_env(tmp_path),
        ldflags="-s -w",
        label="test build",
        out=out,
    )
    for name, word in (("hello", "hello"), ("etcd-like", "server")):
        assert built[name] == tmp_path / "bin" / name
        assert subprocess.run([built[name]], capture_output=True, text=True, check=True).stdout == f"{word}\n"
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["etcd-like", "hello"]  # no temp dir left
    again = gobuild.build(  # a second build into the same place (cached now) replaces them
        {"hello": "example.test/m/cmd/hello"}, tmp_path / "bin", cwd=src, env=go_env(tmp_path),
        ldflags="-s -w", label="again", out=io.StringIO(),
    )  # fmt: skip
    assert again["hello"].exists()
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["etcd-like", "hello"]
    lines = out.getvalue().splitlines()
    bars = [line for line in lines if "packages" in line]
    assert 5 <= len(bars) <= 10, lines  # one per tenth (a tenth may pass in one package)
    assert bars[-1].split("]")[1].split()[0] == "100%", bars
    assert "left" in bars[-1]  # an estimate once a tenth is done
    assert lines[-1].startswith("test build: built hello, etcd-like in"), lines


@pytest.mark.slow
def test_a_failed_build_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    src = module(tmp_path / "src")
    (src / "cmd" / "hello" / "main.go").write_text("package main\n\nfunc main() { undefined() }\n")
    with pytest.raises(gobuild.BuildFailed, match="undefined"):
        gobuild.build(
            {"hello": "example.test/m/cmd/hello"},
            tmp_path / "bin",
            cwd=src,
            env=go_env(tmp_path),
            ldflags="",
            label="test build",
            out=io.StringIO(),
        )
    assert list((tmp_path / "bin").iterdir()) == []


def test_the_bar_on_a_terminal_redraws_one_line() -> None:
    out = io.StringIO()
    progress = gobuild.Progress("x", 20, out, tty=True)
    for _ in range(20):
        progress.advance()
    progress.finish("x: built")
    text = out.getvalue()
    assert text.count("\r") == 21 and text.endswith("x: built\n")
    assert "100% 20/20 packages" in text
