"""Dataset downloads: http(s) only, a size cap, retries for what may pass, and a URL policy.

The policy refuses addresses a job in a cluster must never reach: loopback, private ranges,
link-local (the cloud metadata endpoint 169.254.169.254 is one), and other reserved space; every
redirect hop is checked again. ``allow_loopback`` (local runs and tests only) lets 127.0.0.0/8 and ::1
through — nothing else.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

log = logging.getLogger("kaiten.tuning.download")
ATTEMPTS = 3
MAX_REDIRECTS = 5


class DownloadError(Exception):
    """The input cannot be fetched; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_url(url: str, *, allow_loopback: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise DownloadError("UnsupportedURL", f"{url}: only http and https URLs are accepted")
    host = parts.hostname
    if not host:
        raise DownloadError("UnsupportedURL", f"{url}: no host")
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror as exc:
        raise DownloadError("InputUnreachable", f"{url}: cannot resolve {host}: {exc.strerror}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if address.is_loopback:
            if allow_loopback:
                continue
            raise DownloadError("ForbiddenURL", f"{url}: {host} is a loopback address")
        if address.is_link_local:
            raise DownloadError("ForbiddenURL", f"{url}: {host} is link-local (cloud metadata lives there)")
        if address.is_private or address.is_reserved or address.is_multicast or address.is_unspecified:
            raise DownloadError("ForbiddenURL", f"{url}: {host} ({address}) is a private or reserved address")


def file_name(url: str, index: int) -> str:
    name = Path(urlsplit(url).path).name or f"input-{index}"
    return f"{index:03d}-{name}"


def download(url: str, target: Path, *, allow_loopback: bool, max_bytes: int, index: int = 0) -> Path:
    """Fetch ``url`` into ``target`` (a directory); returns the file."""
    import httpx

    out = target / file_name(url, index)
    for attempt in range(1, ATTEMPTS + 1):
        current = url
        try:
            with httpx.Client(follow_redirects=False, timeout=httpx.Timeout(30.0, read=120.0)) as http:
                for _ in range(MAX_REDIRECTS + 1):
                    check_url(current, allow_loopback=allow_loopback)
                    with http.stream("GET", current) as response:
                        if response.is_redirect:
                            current = urljoin(current, response.headers["location"])
                            continue
                        if response.status_code in (404, 410, 401, 403):
                            raise DownloadError("InputNotFound", f"{url}: HTTP {response.status_code}")
                        if response.status_code >= 500 or response.status_code == 429:
                            raise httpx.TransportError(f"HTTP {response.status_code}")
                        if response.status_code != 200:
                            raise DownloadError("InputUnreachable", f"{url}: HTTP {response.status_code}")
                        size = 0
                        with out.open("wb") as f:
                            for chunk in response.iter_bytes(1 << 20):
                                size += len(chunk)
                                if size > max_bytes:
                                    raise DownloadError(
                                        "InputTooLarge", f"{url}: more than {max_bytes} bytes"
                                    )
                                f.write(chunk)
                        if size == 0:
                            raise DownloadError("EmptyInput", f"{url}: the file is empty")
                        log.info("downloaded %s (%d bytes)", url, size)
                        return out
                raise DownloadError("InputUnreachable", f"{url}: more than {MAX_REDIRECTS} redirects")
        except httpx.TransportError as exc:
            if attempt == ATTEMPTS:
                raise DownloadError("InputUnreachable", f"{url}: {exc} (after {ATTEMPTS} attempts)") from exc
            log.warning("%s: %s; retrying", url, exc)
            time.sleep(2 ** (attempt - 1))
    raise AssertionError("unreachable")
