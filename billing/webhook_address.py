"""Where a webhook may be sent: public addresses only, unless the platform allows more.

A tenant's URL must not reach the platform's own network (a loopback admin port, a metadata
service at 169.254.169.254, a private database), so its host is resolved and *every* address
it resolves to is checked, when the URL is configured and again before each delivery; the
delivery then connects to an address that was checked, so a DNS answer that changes in
between (rebinding) cannot slip a private address in. ``ENSOUL_WEBHOOK_ALLOW_PRIVATE`` lifts
the check (tests, development); ``ENSOUL_WEBHOOK_ALLOWED_HOSTS`` lifts it for named hosts,
addresses or networks (``hooks.internal,10.1.0.0/16``).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressRefused(ValueError):
    """The URL is malformed, does not resolve, or reaches an address that is not allowed."""


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # with the query string
    addresses: tuple[str, ...]  # every address the host resolved to, all allowed


def _allow_list(config: Mapping[str, Any]) -> tuple[set[str], list[Any]]:
    names: set[str] = set()
    networks: list[Any] = []
    for item in str(config.get("ENSOUL_WEBHOOK_ALLOWED_HOSTS") or "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            names.add(item.rstrip("."))
    return names, networks


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (address.is_private or address.is_loopback
                                       or address.is_link_local or address.is_multicast
                                       or address.is_reserved or address.is_unspecified)


def _parse(url: str) -> tuple[str, str, int, str]:
    if any(char <= " " or char == "\x7f" for char in url):  # http.client refuses them later
        raise AddressRefused("The URL is malformed.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise AddressRefused("The URL is malformed.") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AddressRefused("Use an http:// or https:// URL with a host.")
    if parts.username is not None or parts.password is not None:
        raise AddressRefused("The URL may not carry a user name or password.")
    if parts.fragment:
        raise AddressRefused("The URL may not have a fragment.")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https"
                                                          else 80), path


def resolve(url: str, config: Mapping[str, Any]) -> Target:
    """The URL's parts and the addresses to connect to, or :class:`AddressRefused`."""
    scheme, host, port, path = _parse(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressRefused(f"The host {host} does not resolve.") from exc
    addresses = tuple(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not addresses:
        raise AddressRefused(f"The host {host} does not resolve.")
    if not config.get("ENSOUL_WEBHOOK_ALLOW_PRIVATE"):
        names, networks = _allow_list(config)
        if host.rstrip(".") not in names:
            for text in addresses:
                address = ipaddress.ip_address(text)
                if not is_public(address) and not any(address in n for n in networks):
                    raise AddressRefused(
                        f"{host} resolves to {address}, a private, loopback, link-local or "
                        "multicast address; webhooks go to public addresses only.")
    return Target(scheme, host, port, path, addresses)


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the checked address; the Host header still names the host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to the checked address; the certificate is verified for the host name (SNI)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def post(target: Target, body: bytes, headers: Mapping[str, str], timeout: float
         ) -> int:
    """POST to the first checked address; the status code (redirects are not followed)."""
    cls = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    connection = cls(target.host, target.port, target.addresses[0], timeout)
    try:
        connection.request("POST", target.path, body=body, headers=dict(headers))
        response = connection.getresponse()
        response.read(65536)  # the receiver's answer is not kept
        return response.status
    finally:
        connection.close()
