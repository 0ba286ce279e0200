"""A network namespace for the local node, so that its pods have a real, non-loopback address.

On the host's loopback a node cannot be what KubeRay expects: the apiserver refuses 127.0.0.0/8 in
Endpoints (so a Service never has an address and a RayService is never Ready), and KubeRay dials a Ray
head by its Service's DNS name. In a namespace of its own the node gets ``NODE_ADDRESS`` (on the
namespace's ``lo``; nothing leaves the namespace: it has no other interface), its ``hostNetwork`` pods
get that address as their pod IP, Endpoints take it, and ``dns`` answers the cluster's Service names.

- :class:`NetNamespace`: ``ip netns add``; ``wrap(argv)`` runs a program inside (``nsenter --net``,
  which changes nothing else: ``ip netns exec`` would remount ``/sys`` and hide the cgroup mounts the
  kubelet needs); ``call(fn)`` runs a Python function inside, on a thread of its own (``setns`` changes
  the calling thread only), so a readiness check can connect to a port there.
- ``python -m kaiten.local.netns forward NETNS PORT...``: listens on 127.0.0.1:PORT here and forwards
  each connection to 127.0.0.1:PORT inside NETNS (the apiserver for kubectl, a port a test reads). Its
  listening sockets are made before it enters the namespace; every connection it makes after is inside.
- ``python -m kaiten.local.netns dns ADDRESS``, run inside: a DNS server on ADDRESS:53 answering
  ``<service>.<namespace>.svc.cluster.local`` with ADDRESS. On a single node whose pods all use
  ``hostNetwork`` that is where every Service's pods listen (at the Service's port, which must be its
  target port: there is no kube-proxy). Any other name: NXDOMAIN (the machine has no upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

T = TypeVar("T")

# The node's address inside its namespace. Private, but it exists only there: nothing outside can reach
# it or is reached through it.
NODE_ADDRESS = "10.87.0.1"
CLUSTER_DOMAIN = "cluster.local"
_CLONE_NEWNET = 0x40000000
_RUN = Path("/run/netns")


def _enter(path: Path) -> None:
    """The calling thread joins the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass
class NetNamespace:
    name: str
    address: str = NODE_ADDRESS

    @property
    def path(self) -> Path:
        return _RUN / self.name

    def create(self) -> NetNamespace:
        """A new namespace with ``lo`` up and ``address`` on it (one a crash left is replaced)."""
        if self.path.exists():
            self.delete()
        for argv in (
            ["ip", "netns", "add", self.name],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
            ["ip", "-n", self.name, "addr", "add", f"{self.address}/32", "dev", "lo"],
        ):
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise OSError(f"{' '.join(argv)}: {result.stderr.strip()}")
        return self

    def delete(self) -> bool:
        """Remove it (its processes must have stopped); True when it is gone."""
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        return not self.path.exists()

    def wrap(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread inside the namespace (a socket it makes is in there)."""
        outcome: list[T] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                _enter(self.path)
                outcome.append(fn())
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=run, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return outcome[0]

    def port_open(self, port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
        from kaiten.local.procs import port_open

        return self.call(lambda: port_open(host, port, timeout))

    def forwarder_argv(self, ports: list[int]) -> list[str]:
        return [sys.executable, "-m", "kaiten.local.netns", "forward", str(self.path), *map(str, ports)]

    def dns_argv(self) -> list[str]:
        return self.wrap([sys.executable, "-m", "kaiten.local.netns", "dns", self.address])


# -- forward: 127.0.0.1:PORT here → 127.0.0.1:PORT in the namespace ----------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def _serve_forward(listeners: list[socket.socket]) -> None:
    async def connection(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            inner_reader, inner_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, inner_writer), _pipe(inner_reader, writer))
        finally:
            for w in (writer, inner_writer):
                w.close()

    servers = []
    for sock in listeners:
        port = sock.getsockname()[1]

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port) -> None:
            await connection(port, r, w)

        servers.append(await asyncio.start_server(handle, sock=sock))
    await asyncio.gather(*(s.serve_forever() for s in servers))


def forward(netns: Path, ports: list[int]) -> None:
    listeners = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(256)
        sock.setblocking(False)
        listeners.append(sock)
    _enter(netns)  # the only thread yet: the whole process is inside from here on
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forward(listeners))


# -- dns: <service>.<namespace>.svc.cluster.local → the node's address --------------------------------


def answer(query: bytes, address: str, domain: str = CLUSTER_DOMAIN) -> bytes | None:
    """The reply to one DNS query (None for what is not a query)."""
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:  # a response, or not one question
        return None
    labels, offset = [], 12
    while offset < len(query) and (length := query[offset]) != 0:
        if length & 0xC0 or offset + 1 + length > len(query):
            return None
        labels.append(query[offset + 1 : offset + 1 + length].decode("ascii", "replace").lower())
        offset += 1 + length
    end = offset + 5
    if end > len(query):
        return None
    qtype, qclass = struct.unpack("!HH", query[offset + 1 : end])
    question = query[12:end]
    suffix = ["svc", *domain.split(".")]
    ours = len(labels) == 2 + len(suffix) and labels[2:] == suffix
    rcode = 0 if ours else 3  # NXDOMAIN: no such name here, and nothing upstream
    answers = b""
    if ours and qtype == 1 and qclass == 1:  # A, IN
        answers = struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(address)
    reply_flags = 0x8000 | (flags & 0x7900) | 0x0400 | rcode  # QR, opcode + RD copied, AA
    header = struct.pack("!HHHHHH", ident, reply_flags, 1, 1 if answers else 0, 0, 0)
    return header + question + answers


def resolves(name: str, server: str, timeout: float = 1.0) -> str | None:
    """The first A record ``server`` gives for ``name`` (None: no such name, or no answer)."""
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    query = struct.pack("!HHHHHH", 0x4B41, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query, (server, 53))
            reply = sock.recv(512)
        except OSError:
            return None
    if len(reply) < len(query) + 16 or struct.unpack("!H", reply[6:8])[0] == 0:
        return None
    return socket.inet_ntoa(reply[-4:])


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, address: str) -> None:
        self.address = address
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = answer(data, self.address)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _serve_dns(address: str) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: _Dns(address), local_addr=(address, 53))
    print(f"dns: answering *.svc.{CLUSTER_DOMAIN} with {address} on {address}:53", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[0] == "forward":
        forward(Path(argv[1]), [int(p) for p in argv[2:]])
    elif len(argv) == 2 and argv[0] == "dns":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_dns(argv[1]))
    else:
        sys.exit("usage: python -m kaiten.local.netns forward NETNS PORT... | dns ADDRESS")


if __name__ == "__main__":
    main(sys.argv[1:])
