"""Dataset downloads: http(s) only, size caps, retries for what may pass, and a URL policy.

The policy refuses every address that is not global — loopback, private ranges, link-local (the cloud
metadata endpoint 169.254.169.254 is one), carrier-grade NAT (100.64.0.0/10, where one cloud's metadata
service lives), benchmarking and other reserved space; every redirect hop is checked again. The host is
resolved once and the connection goes to the address that was checked (no second lookup a DNS answer
could change: rebinding). ``allow_loopback`` (local runs and tests only) lets 127.0.0.0/8 and ::1
through — nothing else.

URLs may carry credentials (``user:pass@``, a SAS token in the query): only :func:`redact`'s form of
a URL is ever logged or put in an error. A failed download leaves no partial file behind.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

log = logging.getLogger(__name__)
ATTEMPTS = 3
MAX_REDIRECTS = 5


class DownloadError(Exception):
    """The input cannot be fetched; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def redact(url: str) -> str:
    """``url`` without what may be a secret: user info and the query's values."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    query = "&".join(f"{kv.split('=', 1)[0]}=…" for kv in parts.query.split("&") if kv) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def check_url(url: str, *, allow_loopback: bool) -> str:
    """Refuse what the policy forbids; returns the checked address to connect to."""
    parts = urlsplit(url)
    shown = redact(url)
    if parts.scheme not in ("http", "https"):
        raise DownloadError("UnsupportedURL", f"{shown}: only http and https URLs are accepted")
    host = parts.hostname
    if not host:
        raise DownloadError("UnsupportedURL", f"{shown}: no host")
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror as exc:
        raise DownloadError("InputUnreachable", f"{shown}: cannot resolve {host}: {exc.strerror}") from exc
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if address.is_loopback:
            if allow_loopback:
                addresses.append(address)
                continue
            raise DownloadError("ForbiddenURL", f"{shown}: {host} is a loopback address")
        if address.is_link_local:
            raise DownloadError("ForbiddenURL", f"{shown}: {host} is link-local (cloud metadata lives there)")
        if not address.is_global or address.is_multicast:
            raise DownloadError(
                "ForbiddenURL",
                f"{shown}: {host} ({address}) is a private or reserved address, not a global one",
            )
        addresses.append(address)
    return str(addresses[0])


def file_name(url: str, index: int) -> str:
    name = Path(urlsplit(url).path).name or f"input-{index}"
    return f"{index:03d}-{name}"


def _pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """The request for ``url`` sent to ``address``: the URL with the address as its host, the Host
    header, and (https) the name TLS must verify."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    ip = f"[{address}]" if ":" in address else address
    netloc = f"{ip}:{parts.port}" if parts.port else ip
    header = f"{host}:{parts.port}" if parts.port else host
    auth = {}
    if parts.username is not None:  # user info: sent as Basic auth, never in the URL we log
        import base64

        raw = f"{parts.username}:{parts.password or ''}".encode()
        auth = {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return pinned, {"Host": header, **auth}, extensions


def download(url: str, target: Path, *, allow_loopback: bool, max_bytes: int, index: int = 0) -> Path:
    """Fetch ``url`` into ``target`` (a directory); returns the file. ``max_bytes``: what this file may
    take (the caller passes what is left of the job's total)."""
    import httpx

    shown = redact(url)
    out = target / file_name(url, index)
    try:
        for attempt in range(1, ATTEMPTS + 1):
            current = url
            try:
                with httpx.Client(follow_redirects=False, timeout=httpx.Timeout(30.0, read=120.0)) as http:
                    for _ in range(MAX_REDIRECTS + 1):
                        address = check_url(current, allow_loopback=allow_loopback)
                        pinned, headers, extensions = _pinned(current, address)
                        request = http.build_request("GET", pinned, headers=headers, extensions=extensions)
                        response = http.send(request, stream=True)
                        try:
                            if response.is_redirect:
                                current = urljoin(current, response.headers["location"])
                                continue
                            _fail_on_status(shown, response.status_code)
                            size = _save(response, out, shown, max_bytes)
                        finally:
                            response.close()
                        log.info("downloaded %s (%d bytes)", shown, size)
                        return out
                    raise DownloadError("InputUnreachable", f"{shown}: more than {MAX_REDIRECTS} redirects")
            except httpx.TransportError as exc:
                if attempt == ATTEMPTS:
                    raise DownloadError(
                        "InputUnreachable", f"{shown}: {type(exc).__name__} (after {ATTEMPTS} attempts)"
                    ) from exc
                log.warning("%s: %s; retrying", shown, type(exc).__name__)
                time.sleep(2 ** (attempt - 1))
        raise AssertionError("unreachable")
    except BaseException:
        out.unlink(missing_ok=True)  # never a partial file for the next step to read
        raise


def _fail_on_status(shown: str, status: int) -> None:
    import httpx

    if status in (404, 410, 401, 403):
        raise DownloadError("InputNotFound", f"{shown}: HTTP {status}")
    if status >= 500 or status == 429:
        raise httpx.TransportError(f"HTTP {status}")
    if status != 200:
        raise DownloadError("InputUnreachable", f"{shown}: HTTP {status}")


def _save(response: object, out: Path, shown: str, max_bytes: int) -> int:
    size = 0
    with out.open("wb") as f:
        for chunk in response.iter_bytes(1 << 20):  # type: ignore[attr-defined]
            size += len(chunk)
            if size > max_bytes:
                raise DownloadError(
                    "InputTooLarge", f"{shown}: more than the {max_bytes} bytes left to the input"
                )
            f.write(chunk)
    if size == 0:
        raise DownloadError("EmptyInput", f"{shown}: the file is empty")
    return size
