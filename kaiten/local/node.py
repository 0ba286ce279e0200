"""A real single-node Kubernetes cluster on this machine, on loopback only, for the tests that need pods.

``with LocalCluster(dir, images=[...]) as cluster: cluster.kubeconfig`` starts, each by PID and with
every listener on 127.0.0.1:

- etcd and kube-apiserver (:class:`~kaiten.local.controlplane.ControlPlane` with ``node=``: Node + RBAC
  authorization, NodeRestriction and ServiceAccount admission, so pods get tokens);
- kube-controller-manager (Deployments, ReplicaSets, StatefulSets, Jobs, ServiceAccount tokens, the
  garbage collector, …) and kube-scheduler, without leader election;
- containerd (Debian's, with runc) with its state, socket and runc root under ``dir`` and its root (image
  content and snapshots) in the cache, so an image is imported once per machine: CRI with
  ``restrict_oom_score_adj`` (runc cannot raise a score without CAP_SYS_RESOURCE, which we lack),
  cgroupfs, no AppArmor, its streaming server on 127.0.0.1, and a CNI config holding only ``loopback``:
  a pod without ``hostNetwork`` gets a network namespace with nothing but ``lo`` in it, so it can reach
  nothing and nothing can reach it. Our pods use ``hostNetwork`` and bind 127.0.0.1;
- the kubelet (cgroupfs driver, its root, pod logs and plugins under ``dir``, serving on 127.0.0.1 with
  webhook authentication and authorization), registered as node ``name`` with the machine's CPU and
  memory and no GPU. The images given are imported into containerd first (the pause image always).

With ``network=True`` all of it runs in a network namespace of its own (:mod:`kaiten.local.netns`), where
the node has a real address: ``hostNetwork`` pods get it as their IP (so Endpoints and RayServices
work), a small DNS answers Service names, and ``kubectl port-forward`` reaches pods. 127.0.0.1:PORT of the
apiserver here is forwarded in, so the kubeconfig is the same; :meth:`LocalCluster.expose` forwards more,
and :meth:`LocalCluster.wrap` runs a process on the node (with its DNS, if asked).

The kubelet wants ``vm.overcommit_memory=1``, ``kernel.panic=10`` and ``kernel.panic_on_oops=1`` and
would write them on the host. Instead it runs in a mount namespace of its own where those three
``/proc/sys`` files are read-only bind mounts showing the values it wants: the host's settings never
change and no other process sees the difference. ``dir`` is a shared mount, so the volumes the kubelet
mounts for pods there propagate to containerd, which runs outside that namespace.

:meth:`LocalCluster.stop` stops everything it started: the kubelet, every container and sandbox (and
their shims), containerd, the control plane; then unmounts whatever is left under ``dir`` and removes the
``kubepods`` cgroups and the fixed paths that the kubelet and containerd created and that were not there
before. It returns what it could not clean up (nothing, normally), so a test can assert it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml

from kaiten.local.controlplane import ControlPlane, cache_root, ensure_binaries
from kaiten.local.images import Image, ensure, image_id
from kaiten.local.netns import CLUSTER_DOMAIN, NetNamespace, resolves
from kaiten.local.procs import (
    ManagedProcess,
    StartFailed,
    descendants,
    free_port,
    free_ports,
    kill_pids,
    port_open,
    running,
    wait_until,
)

NODE_NAME = "kaiten-node"
TOOLS = ("containerd", "runc", "ctr", "unshare", "mount", "umount")
CNI_BIN = Path("/usr/lib/cni")
# What the kubelet sets on the host unless it already reads these values (see the module docstring).
KUBELET_SYSCTLS = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}
# Paths the kubelet and containerd use whatever their configuration says; removed at stop if we made them.
FIXED_PATHS = (
    Path("/run/containerd"),
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    Path("/var/lib/cni"),
    Path("/etc/cni"),
    Path("/opt/cni"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
K8S_NAMESPACE = "k8s.io"  # containerd's namespace for CRI
# One node per machine: the kubepods cgroups, containerd's shim directory and the kubelet's device-plugin
# directory are machine-wide. Held (flock) from start to the end of stop.
MACHINE_LOCK = Path("/run/lock/kaiten-node.lock")


@dataclass
class Leftovers:
    """What :meth:`LocalCluster.stop` found still there after cleaning up (empty when all went)."""

    processes: set[int] = field(default_factory=set)
    mounts: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.processes or self.mounts or self.cgroups or self.paths)


@dataclass
class LocalCluster:
    state_dir: Path
    name: str = NODE_NAME
    images: Sequence[str] = ()  # deploy/images/<name>.Dockerfile to build (if needed) and import
    startup_timeout: float = 120.0
    # In a network namespace of its own (kaiten.local.netns): pods get a real address (Endpoints,
    # RayService readiness), Service names resolve, kubectl port-forward reaches pods. Off: loopback.
    network: bool = False
    netns: NetNamespace | None = None
    controlplane: ControlPlane | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    imported: dict[str, Image] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _made: list[Path] = field(default_factory=list)
    _shared_mount: bool = False
    _lock: IO[str] | None = None

    # -- paths -----------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        assert self.controlplane is not None
        return self.controlplane.kubeconfig

    @property
    def containerd_socket(self) -> Path:
        return self.state_dir / "containerd" / "containerd.sock"

    # -- start -----------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        if missing := [tool for tool in TOOLS if shutil.which(tool) is None]:
            raise StartFailed(
                f"a local node needs {', '.join(missing)}: apt-get install containerd runc"
                " containernetworking-plugins buildah mmdebstrap"
            )
        self.state_dir = self.state_dir.resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_machine()
        try:  # from here on a failure stops what started and releases the machine lock
            started = time.monotonic()
            bins = ensure_binaries(node=True)
            images = {name: ensure(name) for name in ("pause", *self.images)}
            self.timings["binaries and images"] = time.monotonic() - started
            self._made = [p for p in FIXED_PATHS if not p.exists()] + [
                c for c in _kubepods_cgroups() if not c.exists()
            ]
            started = time.monotonic()
            self._share_state_dir()
            if self.network:
                _forget_namespaces()  # of nodes that crashed: under the machine lock none other runs
                self.netns = NetNamespace(f"{NETNS_PREFIX}{os.getpid()}").create()
            self.controlplane = ControlPlane(
                self.state_dir / "controlplane", node=self.name, netns=self.netns
            ).start()
            self._start_containerd(images["pause"].ref)
            self._forget_older(list(images.values()))
            for image in images.values():
                self._import(image)
            self._start_controller_manager(bins["kube-controller-manager"])
            self._start_scheduler(bins["kube-scheduler"])
            if self.netns is not None:
                self._start_dns(self.netns)
            self._start_kubelet(bins["kubelet"])
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.timings["start to Ready"] = time.monotonic() - started
        return self

    def _lock_machine(self) -> None:
        MACHINE_LOCK.parent.mkdir(parents=True, exist_ok=True)
        lock = MACHINE_LOCK.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise StartFailed(
                f"another local node runs on this machine ({holder}): one at a time, since the kubelet's"
                " cgroups and containerd's shim directory are machine-wide"
            ) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}, state in {self.state_dir}\n")
        lock.flush()
        self._lock = lock

    def _share_state_dir(self) -> None:
        """Make ``state_dir`` a shared mount (a bind onto itself), so that what the kubelet mounts there
        from its own mount namespace is seen by containerd, and the reverse."""
        _run("mount", "--bind", str(self.state_dir), str(self.state_dir))
        self._shared_mount = True
        _run("mount", "--make-shared", str(self.state_dir))

    def _start_containerd(self, pause: str) -> None:
        root = self.state_dir / "containerd"
        (root / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        (root / "cni" / "net.d" / "10-loopback.conflist").write_text(
            json.dumps({"cniVersion": "1.0.0", "name": "kaiten-isolated", "plugins": [{"type": "loopback"}]})
        )
        config = root / "config.toml"
        config.write_text(_containerd_config(root, images_root(), self.containerd_socket, pause))
        proc = ManagedProcess(
            name="containerd",
            argv=self.wrap(["containerd", "--config", str(config), "--log-level", "warn"]),
            log_path=self.state_dir / "containerd.log",
        )
        self.processes.append(proc)  # before it starts: a stop signal raised in start() must find it
        proc.start()
        proc.wait_ready(
            lambda: self._ctr("version", check=False).returncode == 0,
            timeout=30,
            interval=0.2,
            what=f"did not answer on {self.containerd_socket}",
        )

    def _ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", "--address", str(self.containerd_socket), "--namespace", K8S_NAMESPACE, *args]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
        if check and result.returncode != 0:
            raise StartFailed(f"ctr {' '.join(args)} failed:\n{result.stderr[-2000:]}")
        return result

    def tag_image(self, ref: str, new_ref: str) -> None:
        """Another name for an imported image (what a new release tag looks like to the kubelet)."""
        self._ctr("images", "tag", "--force", ref, new_ref)

    def untag_image(self, ref: str) -> None:
        """Remove a name ``tag_image`` added (the content stays while another name refers to it)."""
        self._ctr("images", "rm", ref, check=False)

    def _forget_older(self, images: list[Image]) -> None:
        """Remove every other name in containerd (older builds of our images, a tag a crashed test left)
        and, with ``--sync``, the content only they held. containerd's root outlives a node (an image is
        imported once per machine), so without this every rebuilt Ray image stayed: 40 GB, and the disk
        was full. Everything in this containerd is ours: the images given, by tag and by CRI's
        ``sha256:<config>`` name."""
        keep = {image.ref for image in images} | {image_id(image.ref) for image in images}
        names = self._ctr("images", "list", "--quiet").stdout.split()
        older = [name for name in names if name not in keep]
        if older:
            self._ctr("images", "rm", "--sync", *older, timeout=600)
            print(f"removed {len(older)} older image name(s) from the node's containerd", file=sys.stderr)

    def _import(self, image: Image) -> None:
        started = time.monotonic()
        present = self._ctr("images", "list", "--quiet", f"name=={image.ref}").stdout.split()
        if image.ref not in present:
            self._ctr("images", "import", "--snapshotter", "overlayfs", str(image.archive), timeout=1200)
        self.imported[image.name] = image
        self.timings[f"import {image.name}"] = time.monotonic() - started

    def _start_controller_manager(self, binary: Path) -> None:
        cp = self._cp()
        port = free_port()
        self._start(
            "kube-controller-manager",
            [
                str(binary),
                "--kubeconfig", str(cp.kubeconfig_for("controller-manager")),
                "--leader-elect=false",
                "--use-service-account-credentials",
                "--service-account-private-key-file", str(cp.pki / "sa.key"),
                "--root-ca-file", str(cp.pki / "ca.crt"),
                "--cluster-signing-cert-file", str(cp.pki / "ca.crt"),
                "--cluster-signing-key-file", str(cp.pki / "ca.key"),
                "--bind-address", "127.0.0.1",
                "--secure-port", str(port),
                "--flex-volume-plugin-dir", str(self.state_dir / "flexvolume"),
                "--controllers", "*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle-controller",
                "--v", "1",
            ],
            port,
        )  # fmt: skip

    def _start_scheduler(self, binary: Path) -> None:
        port = free_port()
        kubeconfig = str(self._cp().kubeconfig_for("scheduler"))
        self._start(
            "kube-scheduler",
            [str(binary), "--kubeconfig", kubeconfig, "--authentication-kubeconfig", kubeconfig,
             "--authorization-kubeconfig", kubeconfig, "--leader-elect=false",
             "--bind-address", "127.0.0.1", "--secure-port", str(port), "--v", "1"],
            port,
        )  # fmt: skip

    def _start_kubelet(self, binary: Path) -> None:
        cp = self._cp()
        root = self.state_dir / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        port, healthz = free_ports(2)
        config = root / "config.yaml"
        settings = _kubelet_config(cp.pki, root, self.containerd_socket, port, healthz)
        if self.netns is not None:  # the apiserver dials it at the node's address; pods get the DNS
            settings.update(address=self.netns.address, clusterDNS=[self.netns.address],
                            clusterDomain=CLUSTER_DOMAIN)  # fmt: skip
        config.write_text(yaml.safe_dump(settings))
        views = root / "sysctl-views"
        views.mkdir(exist_ok=True)
        binds = []
        for key, value in KUBELET_SYSCTLS.items():
            view = views / key.replace("/", ".")
            view.write_text(f"{value}\n")
            binds.append(f"mount --bind -o ro {view} /proc/sys/{key}")
        kubelet = [
            str(binary),
            "--config", str(config),
            "--kubeconfig", str(cp.kubeconfig_for("node")),
            "--root-dir", str(root),
            "--hostname-override", self.name,
            "--node-ip", self.netns.address if self.netns else "127.0.0.1",
            "--v", "1",
        ]  # fmt: skip
        # Its own mount namespace: /proc made private there first, so the sysctl views stay in it.
        script = " && ".join(["mount --make-rprivate /proc", *binds, 'exec "$@"'])
        self._start("kubelet", ["unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c",
                                script, "kubelet", *kubelet], healthz)  # fmt: skip

    def _start_dns(self, netns: NetNamespace) -> None:
        proc = ManagedProcess(name="dns", argv=netns.dns_argv(), log_path=self.state_dir / "dns.log")
        self.processes.append(proc)
        proc.start()
        probe = f"kubernetes.default.svc.{CLUSTER_DOMAIN}"
        proc.wait_ready(
            lambda: netns.call(lambda: resolves(probe, netns.address)) == netns.address,
            timeout=30,
            interval=0.2,
            what=f"did not answer {probe} on {netns.address}:53",
        )

    def _start(self, name: str, argv: list[str], port: int) -> None:
        proc = ManagedProcess(name=name, argv=self.wrap(argv), log_path=self.state_dir / f"{name}.log")
        self.processes.append(proc)  # before it starts, as containerd
        proc.start()
        netns = self.netns
        proc.wait_ready(
            (lambda: netns.port_open(port)) if netns else (lambda: port_open("127.0.0.1", port)),
            timeout=self.startup_timeout,
            interval=0.2,
            what=f"did not listen on 127.0.0.1:{port}",
        )

    # -- the node's network namespace ------------------------------------------------------------

    def wrap(self, argv: list[str], *, dns: bool = False) -> list[str]:
        """``argv`` as a process on the node: in its network namespace, if it has one; with ``dns``,
        in a mount namespace of its own where /etc/resolv.conf names the node's DNS (the pods get it
        from the kubelet; a process such as KubeRay's operator gets it so)."""
        if self.netns is None:
            return argv
        if dns:
            conf = self.state_dir / "resolv.conf"
            conf.write_text(f"nameserver {self.netns.address}\noptions ndots:1\n")
            argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                    f'mount --bind -o ro {conf} /etc/resolv.conf && exec "$@"', "on-node", *argv]  # fmt: skip
        return self.netns.wrap(argv)

    def expose(self, *ports: int) -> None:
        """127.0.0.1:PORT on this machine reaches 127.0.0.1:PORT on the node (in its namespace), until
        the node stops. Without a namespace the two are the same already."""
        if self.netns is None or not ports:
            return
        proc = ManagedProcess(
            name=f"forward-{'-'.join(map(str, ports))}",
            argv=self.netns.forwarder_argv(list(ports)),
            log_path=self.state_dir / f"forward-{ports[0]}.log",
        )
        self.processes.append(proc)
        proc.start()
        proc.wait_ready(lambda: all(port_open("127.0.0.1", p) for p in ports), timeout=30, what="no listener")

    def _cp(self) -> ControlPlane:
        assert self.controlplane is not None
        return self.controlplane

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 60, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin, capture_output=True, text=True, check=False, timeout=timeout,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise StartFailed(f"kubectl {' '.join(args)} failed:\n{result.stderr[-2000:]}")
        return result

    def _wait_ready(self) -> None:
        """The node registered and Ready; then its address set to 127.0.0.1 (the kubelet refuses to
        report a loopback address itself, and the apiserver reaches it for logs and exec by that)."""
        kubelet = next(p for p in self.processes if p.name == "kubelet")
        kubelet.wait_ready(
            self._node_ready, timeout=self.startup_timeout, interval=0.5, what="node not Ready"
        )
        if self.netns is not None:  # it reports its namespace's address itself
            return
        addresses = [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": self.name},
        ]
        self.kubectl("patch", "node", self.name, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": {"addresses": addresses}}))  # fmt: skip

    def _node_ready(self) -> bool:
        result = self.kubectl("get", "node", self.name, "-o", "json", check=False, timeout=10)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # -- stop ------------------------------------------------------------------------------------

    def pids(self) -> set[int]:
        """Every process of this node: ours, containerd's shims and what runs in the containers."""
        cp = self.controlplane.processes if self.controlplane else []
        mine = {p.pid for p in [*self.processes, *cp] if p.proc is not None}
        shims = _shims(self.containerd_socket)
        return running(mine | shims | {d for pid in shims for d in _descendants(pid)})

    def stop(self) -> Leftovers:
        """Stop everything (see the module docstring); returns what is left (normally nothing)."""
        by_name = {p.name: p for p in self.processes}
        if kubelet := by_name.get("kubelet"):
            kubelet.stop(timeout=10)
        shims = _shims(self.containerd_socket)
        if (containerd := by_name.get("containerd")) and containerd.alive():
            self._remove_containers()
        workloads = shims | {d for pid in shims for d in _descendants(pid)}
        for name in ("containerd", "kube-scheduler", "kube-controller-manager"):
            if proc := by_name.get(name):
                proc.stop(timeout=10)
        for proc in self.processes:  # the DNS and the forwarders
            if proc.alive():
                proc.stop(timeout=10)
        kill_pids(running(workloads))
        wait_until(lambda: not running(workloads), 10)
        if self.controlplane is not None:
            self.controlplane.stop()
        left = Leftovers(processes=running(workloads | {p.pid for p in self.processes if p.alive()}))
        self.processes.clear()
        left.mounts = self._unmount_all()
        left.cgroups = _remove_cgroups([c for c in self._made if str(c).startswith(str(CGROUP_ROOT))])
        if self.netns is not None:
            if not self.netns.delete():
                left.paths.append(str(self.netns.path))
            self.netns = None
        for path in self._made:
            if not str(path).startswith(str(CGROUP_ROOT)):
                shutil.rmtree(path, ignore_errors=True)
                if path.exists():
                    left.paths.append(str(path))
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
        return left

    def _remove_containers(self) -> None:
        """Kill every task (containers and sandboxes), then delete them, through containerd."""
        tasks = self._ctr("tasks", "list", "--quiet", check=False).stdout.split()
        for task in tasks:
            self._ctr("tasks", "kill", "--signal", "SIGKILL", "--all", task, check=False)
        deadline = time.monotonic() + 10
        while tasks and time.monotonic() < deadline:
            for task in list(tasks):
                if self._ctr("tasks", "delete", task, check=False).returncode == 0:
                    tasks.remove(task)
            time.sleep(0.2)
        for container in self._ctr("containers", "list", "--quiet", check=False).stdout.split():
            self._ctr("containers", "delete", container, check=False)

    def _unmount_all(self) -> list[str]:
        """Lazily unmount everything under ``state_dir`` (deepest first), then the shared bind itself."""
        for target in sorted(_mounts_under(self.state_dir), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", target], capture_output=True, check=False)
        if self._shared_mount:
            subprocess.run(["umount", "--lazy", str(self.state_dir)], capture_output=True, check=False)
            self._shared_mount = False
        return [m for m in _mounts_under(self.state_dir, include_self=True)]

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- helpers ---------------------------------------------------------------------------------------


def _run(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StartFailed(f"{' '.join(argv)} failed: {result.stderr.strip()}")


NETNS_PREFIX = "kaiten-node-"


def _forget_namespaces() -> None:
    """Remove the network namespaces of nodes whose process is gone (a crash skipped their stop)."""
    for path in Path("/run/netns").glob(f"{NETNS_PREFIX}*"):
        pid = path.name.removeprefix(NETNS_PREFIX)
        if pid.isdigit() and not running({int(pid)}):
            NetNamespace(path.name).delete()
            print(f"removed {path.name}, left by a node that did not stop", file=sys.stderr)


def _descendants(pid: int) -> set[int]:
    try:
        return descendants(pid)
    except subprocess.CalledProcessError:
        return set()


def _shims(socket: Path) -> set[int]:
    """containerd-shim processes serving our containerd (by the socket they were started for)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(socket).encode() in argv:
                found.add(int(proc.name))
    return found


def _mounts_under(root: Path, include_self: bool = False) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    targets = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        if target.startswith(prefix) or (include_self and target == str(root)):
            targets.append(target)
    return targets


def _kubepods_cgroups() -> list[Path]:
    """The ``kubepods`` cgroup the kubelet makes in each v1 hierarchy (and in the unified one)."""
    if not CGROUP_ROOT.is_dir():
        return []
    return [h / "kubepods" for h in CGROUP_ROOT.iterdir() if h.is_dir() and not h.is_symlink()]


def _remove_cgroups(cgroups: list[Path]) -> list[str]:
    """rmdir each cgroup tree, deepest first (a cgroup with no processes can be removed)."""
    left = []
    for top in cgroups:
        if not top.exists():
            continue
        for path in sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
        if top.exists():
            left.append(str(top))
    return left


def images_root() -> Path:
    """containerd's root (content and snapshots) outlives a node: an image is imported once per machine.
    Only one node runs at a time (MACHINE_LOCK), and every container is deleted at stop."""
    return cache_root() / "node" / "containerd"


def _containerd_config(root: Path, content: Path, socket: Path, pause: str) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{content}"
state = "{root / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"

[{cri}]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = "{shutil.which("runc") or "/usr/sbin/runc"}"
  Root = "{root / "runc"}"

[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{root / "cni" / "net.d"}"
"""


def _kubelet_config(pki: Path, root: Path, socket: Path, port: int, healthz: int) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "127.0.0.1",
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet.key"),
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{socket}",
        "failSwapOn": False,
        "podLogsDir": str(root / "pod-logs"),
        "volumePluginDir": str(root / "volume-plugins"),
        "makeIPTablesUtilChains": False,
        "resolvConf": "/etc/resolv.conf",
        # A test machine's disk is what it is: evict only when it is really full, never GC our images.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "staticPodPath": "",
        "enableDebuggingHandlers": True,  # kubectl logs / exec
    }


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command line of ``python -m kaiten.local.node`` (``--help`` started a node in ``./--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m kaiten.local.node",
        description="A real single-node cluster (kubelet + containerd) by hand, until SIGTERM or ^C.",
    )
    parser.add_argument("dir", type=Path, help="its state: control plane, containerd, kubelet")
    parser.add_argument("images", nargs="*", help="our images to build and import: services, ray, nats")
    parser.add_argument("--network", action="store_true", help="in a network namespace of its own")
    return parser.parse_args(argv)


if __name__ == "__main__":
    import signal

    options = _parse(sys.argv[1:])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    cluster = LocalCluster(options.dir, images=options.images, network=options.network)
    try:
        cluster.start()
        print(f"export KUBECONFIG={cluster.kubeconfig}  # {cluster.timings}", flush=True)
        signal.pause()
    finally:
        print(f"stopped; left behind: {cluster.stop() or 'nothing'}", flush=True)
