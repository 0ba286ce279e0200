"""The real Kubernetes control plane (etcd + kube-apiserver) on 127.0.0.1, the envtest way.

The binaries are built once from Go modules (``deploy/controlplane/go.mod``: ``k8s.io/kubernetes``
v1.32.4 with its staging modules pinned by ``replace``, etcd v3.5) and cached under
``$KAITEN_CACHE_DIR`` (default ``~/.cache/kaiten``). Each start generates a CA, a serving certificate,
an admin client certificate (``system:masters``) and a service-account key, starts etcd and the
apiserver on free loopback ports with RBAC authorization, waits for ``/readyz`` and writes a
kubeconfig.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import sys
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kaiten.bundle import CONTROLPLANE_MODULE
from kaiten.local import gobuild
from kaiten.local.netns import NetNamespace
from kaiten.local.procs import ManagedProcess, StartFailed, free_port, free_ports, port_open

K8S_VERSION = "v1.32.4"
ETCD_VERSION = "v3.5.16"
# A Service per inference Workspace: a /16 as a cluster has (a /24 ran out at 253 Workspaces). Nothing of
# ours ever dials these addresses.
SERVICE_CIDR = "10.0.0.0/16"
BUILD_ESTIMATE = "about 3-5 minutes on 2 cores; ~0.6 GB of Go modules, ~2 GB of build cache"


def served_requests(metrics: str) -> Counter[str]:
    """The apiserver's own count of the requests it has served, from the text of its ``/metrics``
    (``apiserver_request_total``), by verb and resource: ``PATCH workspaces/status``."""
    counts: Counter[str] = Counter()
    for line in metrics.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        inside, value = line[line.index("{") + 1 : line.rindex("}")], line.rsplit(" ", 1)[1]
        labels = {k: v.strip('"') for k, v in (pair.split("=", 1) for pair in inside.split(","))}
        if not labels.get("resource"):
            continue  # not about a resource (discovery, /healthz, ...)
        what = labels["resource"] + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        counts[f"{labels['verb']} {what}"] += int(float(value))
    return counts


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    """Where builds are cached: ``$KAITEN_CACHE_DIR``, default ``~/.cache/kaiten``."""
    return Path(os.environ.get("KAITEN_CACHE_DIR") or str(Path.home() / ".cache" / "kaiten"))


def cache_dir() -> Path:
    return cache_root() / "controlplane" / f"{K8S_VERSION}-etcd{ETCD_VERSION}"


PACKAGES = {
    "etcd": "go.etcd.io/etcd/server/v3",
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    # a node (kaiten.local.node): only built when one is asked for
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kubelet": "k8s.io/kubernetes/cmd/kubelet",
}
NODE_BINARIES = ("kube-controller-manager", "kube-scheduler", "kubelet")


def binaries(node: bool = False) -> dict[str, Path]:
    root = cache_dir()
    return {name: root / name for name in PACKAGES if node or name not in NODE_BINARIES}


def ensure_binaries(node: bool = False) -> dict[str, Path]:
    """Build etcd and kube-apiserver (and, for a node, kube-controller-manager, kube-scheduler and the
    kubelet) from Go modules if they are not cached yet."""
    bins = binaries(node)
    missing = {name: PACKAGES[name] for name, path in bins.items() if not path.exists()}
    if not missing:
        return bins
    module = CONTROLPLANE_MODULE  # deploy/controlplane, or the installed package's copy
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOSUMDB": "off"}
    # GOSUMDB=off: the checksum database may be unreachable; go.sum in the repo pins every module hash.
    print(
        f"building {', '.join(missing)} (Kubernetes {K8S_VERSION}, etcd {ETCD_VERSION}) from Go modules "
        f"(first run only; {BUILD_ESTIMATE})",
        file=sys.stderr,
        flush=True,
    )
    out_dir = next(iter(bins.values())).parent
    try:  # one go build for all: shared packages compile once, a link overlaps the next compile
        gobuild.build(missing, out_dir, cwd=module, env=env, ldflags=_ldflags(), label="control plane")
    except gobuild.BuildFailed as exc:
        raise StartFailed(str(exc)) from exc
    return bins


def _ldflags() -> str:
    """Stamp the real version, as Kubernetes' own build does (else it reports v0.0.0-master); etcd links
    no ``component-base`` and ignores the stamp."""
    major, minor = K8S_VERSION.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    return (
        f"-s -w -X {pkg}.gitVersion={K8S_VERSION} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} "
        f"-X {pkg}.gitTreeState=clean"
    )


# --- certificates ---------------------------------------------------------------------------------


# What a node adds (ControlPlane(node=...)): name → (CN, O, server cert?). The apiserver's client to the
# kubelets is in system:masters (what kubeadm gave it up to 1.28): the kubelet authorizes it by webhook.
NODE_CERTS = {
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters", False),
    "controller-manager": ("system:kube-controller-manager", None, False),
    "scheduler": ("system:kube-scheduler", None, False),
    "node": ("system:node:{node}", "system:nodes", False),
    "kubelet": ("{node}", None, True),
}


def _certs_valid(
    pki: Path,
    node: str | None = None,
    margin: dt.timedelta = dt.timedelta(days=7),
    node_address: str | None = None,
) -> bool:
    """All of them there (a node's too, if one is asked for, for ``node_address`` too if one is given),
    and none expiring within ``margin``."""
    from cryptography import x509

    names = ["ca.crt", "apiserver.crt", "apiserver.key", "admin.crt", "admin.key", "sa.key", "sa.pub"]
    certs = ["ca.crt", "apiserver.crt", "admin.crt"]
    if node:
        names += ["ca.key", *(f"{n}.{ext}" for n in NODE_CERTS for ext in ("crt", "key"))]
        certs += [f"{n}.crt" for n in NODE_CERTS]
        if (pki / "node.crt").exists():
            subject = x509.load_pem_x509_certificate((pki / "node.crt").read_bytes()).subject
            if subject.rfc4514_string().split(",")[0] != f"CN=system:node:{node}":
                return False
        if node_address and (pki / "kubelet.crt").exists():
            cert = x509.load_pem_x509_certificate((pki / "kubelet.crt").read_bytes())
            ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if ipaddress.ip_address(node_address) not in ips.get_values_for_type(x509.IPAddress):
                return False
    if not all((pki / name).exists() for name in names):
        return False
    soonest = min(
        x509.load_pem_x509_certificate((pki / name).read_bytes()).not_valid_after_utc for name in certs
    )
    return soonest - dt.datetime.now(dt.UTC) > margin


def _write_certs(pki: Path, node: str | None = None, node_address: str | None = None) -> None:
    """``node_address``: the kubelet's address besides 127.0.0.1 (in its serving certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("kaiten-local-ca"))
        .issuer_name(name("kaiten-local-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, org: str | None, usage: x509.ObjectIdentifier, san: bool, extra: tuple[str, ...] = ()
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn, org))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        *(x509.IPAddress(ipaddress.ip_address(a)) for a in extra),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    serving, serving_key = leaf("kube-apiserver", None, ExtendedKeyUsageOID.SERVER_AUTH, san=True)
    admin, admin_key = leaf("kaiten-admin", "system:masters", ExtendedKeyUsageOID.CLIENT_AUTH, san=False)
    (pki / "apiserver.crt").write_bytes(serving)
    (pki / "apiserver.key").write_bytes(serving_key)
    (pki / "admin.crt").write_bytes(admin)
    (pki / "admin.key").write_bytes(admin_key)
    if node:  # the controller-manager signs with the CA (cluster signing), so its key is kept
        (pki / "ca.key").write_bytes(key_pem(ca_key))
        for file, (cn, org, server) in NODE_CERTS.items():
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            extra = (node_address,) if server and node_address else ()
            cert, key = leaf(cn.format(node=node), org, usage, san=server, extra=extra)
            (pki / f"{file}.crt").write_bytes(cert)
            (pki / f"{file}.key").write_bytes(key)
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (pki / "sa.key").write_bytes(key_pem(sa))
    (pki / "sa.pub").write_bytes(
        sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for path in pki.iterdir():
        path.chmod(0o600)


def _kubeconfig(server: str, pki: Path, user: str = "admin") -> str:
    """A kubeconfig for ``server`` as the client certificate ``pki/<user>.crt``."""
    import base64

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return f"""apiVersion: v1
kind: Config
clusters:
- name: kaiten-local
  cluster:
    server: {server}
    certificate-authority-data: {b64(pki / "ca.crt")}
users:
- name: kaiten-admin
  user:
    client-certificate-data: {b64(pki / f"{user}.crt")}
    client-key-data: {b64(pki / f"{user}.key")}
contexts:
- name: kaiten-local
  context:
    cluster: kaiten-local
    user: kaiten-admin
    namespace: default
current-context: kaiten-local
"""


# --- the control plane ----------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """``with ControlPlane(dir) as cp: cp.kubeconfig``; stops both processes by PID on exit.

    ``node``: the name of a kubelet that will join (``kaiten.local.node``): its certificates are made,
    and the apiserver runs as a cluster's does (Node + RBAC authorization, NodeRestriction and
    ServiceAccount admission, a client certificate for talking to kubelets)."""

    state_dir: Path
    node: str | None = None
    netns: NetNamespace | None = None  # run inside it; 127.0.0.1:api_port here is forwarded there
    startup_timeout: float = 90.0
    processes: list[ManagedProcess] = field(default_factory=list)
    api_port: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    def kubeconfig_for(self, user: str) -> Path:
        """A kubeconfig with the client certificate ``pki/<user>.crt`` (written on first use)."""
        path = self.state_dir / f"{user}.kubeconfig"
        path.write_text(_kubeconfig(self.server, self.pki, user))
        path.chmod(0o600)
        return path

    def start(self) -> ControlPlane:
        bins = ensure_binaries()
        address = self.netns.address if self.netns else None
        # a restart keeps them: running clients trust this CA
        if not _certs_valid(self.pki, self.node, node_address=address):
            _write_certs(self.pki, self.node, address)
        pki = self.pki
        try:
            etcd_url = self._start_etcd(bins["etcd"])
            self._start_apiserver(bins["kube-apiserver"], etcd_url, pki)
        except BaseException:
            self.stop()
            raise
        self.kubeconfig.write_text(_kubeconfig(self.server, pki))
        self.kubeconfig.chmod(0o600)
        return self

    def _start_etcd(self, binary: Path) -> str:
        client, peer = free_ports(2)
        url = f"http://127.0.0.1:{client}"
        data = self.state_dir / "etcd"
        etcd = ManagedProcess(
            name="etcd",
            argv=self._wrap(
                [
                    str(binary),
                    "--name",
                    "kaiten",
                    "--data-dir",
                    str(data),
                    "--listen-client-urls",
                    url,
                    "--advertise-client-urls",
                    url,
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{peer}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{peer}",
                    "--initial-cluster",
                    f"kaiten=http://127.0.0.1:{peer}",
                    "--unsafe-no-fsync",
                    "--quota-backend-bytes",
                    str(2 * 1024**3),
                    "--log-level",
                    "warn",
                ]
            ),
            log_path=self.state_dir / "etcd.log",
        )
        self.processes.append(etcd)  # before it starts: a stop signal raised in start() must find it
        etcd.start()
        netns = self.netns
        etcd.wait_ready(
            (lambda: netns.port_open(client)) if netns else (lambda: port_open("127.0.0.1", client)),
            timeout=30,
            what=f"did not listen on 127.0.0.1:{client}",
        )
        return url

    def _start_apiserver(self, binary: Path, etcd_url: str, pki: Path) -> None:
        self.api_port = self.api_port or free_port()  # a restart keeps the address (and the kubeconfig)
        if self.netns is not None:  # kubectl, the tests and the readiness check below reach it through this
            forwarder = ManagedProcess(
                name="apiserver-forwarder",
                argv=self.netns.forwarder_argv([self.api_port]),
                log_path=self.state_dir / "apiserver-forwarder.log",
            )
            self.processes.append(forwarder)
            forwarder.start()
            port = self.api_port
            forwarder.wait_ready(lambda: port_open("127.0.0.1", port), timeout=30, what="did not listen")
        api = ManagedProcess(
            name="kube-apiserver",
            argv=self._wrap(
                [
                    str(binary),
                    "--etcd-servers",
                    etcd_url,
                    "--bind-address",
                    "127.0.0.1",
                    "--advertise-address",
                    "127.0.0.1",
                    "--secure-port",
                    str(self.api_port),
                    "--cert-dir",
                    str(self.state_dir / "apiserver-certs"),
                    "--tls-cert-file",
                    str(pki / "apiserver.crt"),
                    "--tls-private-key-file",
                    str(pki / "apiserver.key"),
                    "--client-ca-file",
                    str(pki / "ca.crt"),
                    "--service-account-issuer",
                    "https://kubernetes.default.svc",
                    "--service-account-key-file",
                    str(pki / "sa.pub"),
                    "--service-account-signing-key-file",
                    str(pki / "sa.key"),
                    "--service-cluster-ip-range",
                    SERVICE_CIDR,
                    "--allow-privileged=true",
                    "--endpoint-reconciler-type",
                    "none",
                    "--enable-priority-and-fairness=false",
                    "--profiling=false",
                    "--v",
                    "1",
                    *self._access_args(pki),
                ]
            ),
            log_path=self.state_dir / "kube-apiserver.log",
        )
        self.processes.append(api)  # before it starts, as etcd
        api.start()
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=context, timeout=2) as resp:  # noqa: S310 - our https URL
                    return bool(resp.status == 200)
            except OSError:
                return False

        api.wait_ready(
            ready,
            timeout=self.startup_timeout,
            interval=0.25,
            what=f"not ready at {self.server}/readyz within {self.startup_timeout:g}s",
        )

    def _wrap(self, argv: list[str]) -> list[str]:
        return self.netns.wrap(argv) if self.netns is not None else argv

    def _access_args(self, pki: Path) -> list[str]:
        if not self.node:  # no pods: no ServiceAccount tokens to admit
            return ["--authorization-mode", "RBAC", "--disable-admission-plugins", "ServiceAccount"]
        return [
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction",
            "--kubelet-client-certificate", str(pki / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(pki / "apiserver-kubelet-client.key"),
            "--kubelet-certificate-authority", str(pki / "ca.crt"),
            "--kubelet-preferred-address-types", "InternalIP,Hostname",
        ]  # fmt: skip

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
