"""Fetching `http(s)` image URLs without opening an SSRF hole. Off unless `allow_remote_images` is set.

Rules: only hosts on the allow list; every address the name resolves to must be public (no loopback, private,
link-local, multicast, reserved or cloud-metadata range), and the connection goes to the address that was checked
(the URL's host is kept for the Host header and TLS name, so a DNS answer that changes between check and connect
cannot redirect us); at most `MAX_REDIRECTS` redirects, each checked the same way; a byte cap and a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

MAX_REDIRECTS = 3
# Carrier-grade NAT, link-local/metadata, AWS's IPv6 metadata, "this network", and IPv6 ranges that embed an IPv4
# address (6to4, NAT64, Teredo): an embedded loopback or private address must not slip through as "global".
_BLOCKED_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("100.64.0.0/10", "169.254.0.0/16", "fd00:ec2::/32", "0.0.0.0/8", "::ffff:0:0/96", "2002::/16",
              "64:ff9b::/96", "64:ff9b:1::/48", "2001::/32")
)


class RemoteImageError(ValueError):
    """A URL we refuse to fetch or could not fetch; always the client's problem (400/413)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def is_public_address(address: str) -> bool:
    """Whether an IP address is globally routable and not a metadata or translation range."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local:
        return False
    return not any(ip in net for net in _BLOCKED_NETS)


async def _resolve_public(host: str, port: int) -> str:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RemoteImageError(f"cannot resolve image host {host!r}") from e
    addresses = sorted({str(info[4][0]) for info in infos})  # the host of (host, port[, flow, scope])
    if not addresses or not all(is_public_address(a) for a in addresses):
        raise RemoteImageError(f"image host {host!r} resolves to a non-public address")
    return addresses[0]


async def fetch_image(
    url: str, *, allowed_hosts: list[str], max_bytes: int, timeout: float, client: httpx.AsyncClient | None = None
) -> bytes:
    """The bytes at `url`, or RemoteImageError."""
    own = client is None
    client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise RemoteImageError(f"image URL scheme {parts.scheme!r} is not allowed (data:, http:, https:)")
            host = (parts.hostname or "").lower()
            if host not in {h.lower() for h in allowed_hosts}:
                raise RemoteImageError(f"image host {host!r} is not on the allow list")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = await _resolve_public(host, port)
            netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
            request = client.build_request("GET", target, headers={"Host": parts.netloc},
                                           extensions={"sni_hostname": host})
            try:
                response = await asyncio.wait_for(client.send(request, stream=True), timeout)
            except (httpx.HTTPError, TimeoutError) as e:
                raise RemoteImageError(f"could not fetch image from {host}: {type(e).__name__}") from e
            try:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise RemoteImageError(f"image URL answered {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise RemoteImageError(f"remote image is {declared} bytes, over {max_bytes}", too_large=True)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise RemoteImageError(f"remote image is over {max_bytes} bytes", too_large=True)
                return bytes(data)
            finally:
                await response.aclose()
        raise RemoteImageError(f"image URL redirected more than {MAX_REDIRECTS} times")
    finally:
        if own:
            await client.aclose()
