"""The local node's network namespace (``kaiten.local.netns``): created and removed, a port inside reached
from here through the forwarder and nothing else, Service names answered by its DNS, nothing listening
on this machine's own interfaces but the forwarder on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kaiten.local.netns import NetNamespace, answer, resolves
from kaiten.local.procs import ManagedProcess, free_port, port_open


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    ns = NetNamespace(f"kaiten-test-{uuid.uuid4().hex[:6]}").create()
    try:
        yield ns
    finally:
        assert ns.delete(), f"{ns.path} is still there"


def test_a_port_inside_is_reached_only_through_the_forwarder(netns: NetNamespace, tmp_path: Path) -> None:
    port = free_port()
    server = netns.call(lambda: socket.create_server(("127.0.0.1", port)))
    assert not port_open("127.0.0.1", port), "a listener inside is not on this machine's loopback"
    assert netns.port_open(port) and not netns.port_open(free_port())

    def echo() -> None:  # until a connection says something (the port_open probe above says nothing)
        with server:
            while True:
                with server.accept()[0] as conn:
                    if data := conn.recv(100):
                        conn.sendall(b"echo:" + data)
                        return

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    forwarder = ManagedProcess(
        name="forward", argv=netns.forwarder_argv([port]), log_path=tmp_path / "forward.log"
    ).start()
    try:
        forwarder.wait_ready(lambda: port_open("127.0.0.1", port), timeout=30, what="did not listen")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"hello")
            assert conn.recv(100) == b"echo:hello"
        thread.join(5)
    finally:
        forwarder.stop()
    assert not port_open("127.0.0.1", port)


def test_its_dns_answers_service_names_with_the_nodes_address(netns: NetNamespace, tmp_path: Path) -> None:
    dns = ManagedProcess(name="dns", argv=netns.dns_argv(), log_path=tmp_path / "dns.log").start()
    try:
        name = "web-head-svc.default.svc.cluster.local"
        dns.wait_ready(
            lambda: netns.call(lambda: resolves(name, netns.address)) is not None,
            timeout=30,
            what="no answer",
        )
        assert netns.call(lambda: resolves(name, netns.address)) == netns.address
        for other in ("example.com", "a.b.default.svc.cluster.local", "web.default.pod.cluster.local"):
            assert netns.call(lambda other=other: resolves(other, netns.address)) is None, other
        assert resolves(name, netns.address, timeout=0.3) is None  # not reachable from this machine
    finally:
        dns.stop()


def test_a_malformed_query_gets_no_answer() -> None:
    assert answer(b"\x00\x01", "10.87.0.1") is None
    assert answer(b"\x00\x01\x81\x00" + b"\x00" * 8, "10.87.0.1") is None  # a response, not a query
    truncated = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web"
    assert answer(truncated, "10.87.0.1") is None


def test_a_crashed_nodes_namespace_is_removed_and_a_running_ones_kept() -> None:
    """A node's namespace is named after its process; one whose process is gone is a crash's."""
    from kaiten.local.node import NETNS_PREFIX, _forget_namespaces

    gone = subprocess.Popen(["true"])
    gone.wait()
    running = subprocess.Popen(["sleep", "60"])
    crashed = NetNamespace(f"{NETNS_PREFIX}{gone.pid}")
    live = NetNamespace(f"{NETNS_PREFIX}{running.pid}")
    try:
        crashed.create()
        live.create()
        _forget_namespaces()
        assert not crashed.path.exists(), "a crashed node's namespace was kept"
        assert live.path.exists(), "a running node's namespace was removed"
    finally:
        running.kill()
        running.wait()
        assert crashed.delete() and live.delete()
