"""What the crawl will fetch: http and https only, and never an address inside this machine or
its network unless the config names it (``crawl.allow_private_hosts``).

Search-engine results, a site's links and every redirect come from strangers: a result (or a
public page answering 302) pointing at ``127.0.0.1:6379``, ``169.254.169.254`` or a printer on
the LAN would otherwise be fetched, kept and trained on (server-side request forgery). So the
address a host name resolves to is checked, whatever spelling the URL used (``localhost``,
``2130706433``, ``0x7f.1``, ``[::ffff:127.0.0.1]``): getaddrinfo does the reading, the check
sees what it gives.

The check runs twice for each request: before it is sent (in the adapter's ``send()``, which
requests calls for every request of the session, proxied or not, so the reason is plain) and
inside the connection itself, which connects to the address it has just checked, so a DNS
answer that changes between the two (DNS rebinding) is checked again and never reaches an
unchecked address. Through a proxy only the first applies: the connection goes to the proxy,
which resolves the name itself.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    NameResolutionError,
    NewConnectionError,
)

SCHEMES = ("http", "https")
ALLOW_KEY = "crawl.allow_private_hosts"
# The kinds of address a crawl never reaches unless allowed, in the order a reason names them
# (0.0.0.0 is also "private" to Python: the first kind that fits is the one named).
_NON_PUBLIC = ("loopback", "unspecified", "link_local", "multicast", "private", "reserved", "site_local")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedURL(ValueError):
    """A URL the crawl will not fetch: asking again gives the same answer, for ever, or (with
    ``while_key``) while that config key keeps its value."""

    def __init__(self, message: str, while_key: str | None = None):
        super().__init__(message)
        self.while_key = while_key


def non_public_kind(address: IPAddress) -> str:
    """Why ``address`` is not a public internet address ("loopback", "private", ...), "" if it is one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel
    for kind in _NON_PUBLIC:
        if getattr(address, f"is_{kind}", False):
            return kind.replace("_", "-")
    # is_global is False for the rest that is not routed on the internet (100.64.0.0/10, ...);
    # multicast is "global" to Python, hence the list above
    return "" if address.is_global else "not globally routable"


def _split(url: str):
    """urlsplit, a malformed URL ("http://[::1") being a final refusal rather than a ValueError
    (which the crawl would record as a download error and try again every run)."""
    try:
        return urlsplit(url)
    except ValueError as error:
        raise RefusedURL(f"malformed URL {url[:200]!r}: {error}") from None


def check_scheme(url: str) -> None:
    scheme = _split(url).scheme.lower()
    if not scheme:
        raise RefusedURL(f"not a URL (no http:// or https://): {url[:200]!r}")
    if scheme not in SCHEMES:
        raise RefusedURL(f"unsupported URL scheme {scheme!r}: the crawl fetches http and https URLs only")


@dataclass(frozen=True)
class _Allowed:
    """One entry of crawl.allow_private_hosts: a host name, an address or a network, perhaps with a port."""

    name: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None

    def admits(self, host: str, port: int, address: IPAddress) -> bool:
        if self.port is not None and self.port != port:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return host.lower().rstrip(".") == self.name or (self.network is not None and address in self.network)


def parse_allowed(entry: str) -> _Allowed:
    """``host``, ``host:port``, ``10.0.0.0/8``, ``[::1]:8080``... -> the entry; ValueError naming it if malformed."""
    text, port = entry.strip(), None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"'{ALLOW_KEY}' entry {entry!r}: write an IPv6 address with a port as [::1]:8080")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"'{ALLOW_KEY}' entry {entry!r}: the port must be a number from 1 to 65535")
        port = int(port)
    if not host:
        raise ValueError(f"'{ALLOW_KEY}' entry {entry!r}: no host")
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        if "/" in host:
            raise ValueError(f"'{ALLOW_KEY}' entry {entry!r}: not a network (e.g. 10.0.0.0/8)") from None
        network = None
    return _Allowed(host.lower().rstrip("."), network, port)


def target_of(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL; RefusedURL for another scheme or a malformed URL. No lookup."""
    check_scheme(url)
    parts = _split(url)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as error:  # a port that is not a number, a bad IPv6 literal
        raise RefusedURL(f"malformed URL {url[:200]!r}: {error}") from None
    if not host:
        raise RefusedURL(f"malformed URL {url[:200]!r}: no host")
    return host, port


class AddressPolicy:
    """Which hosts a crawl may connect to: every public address, and the non-public ones its
    ``crawl.allow_private_hosts`` entries name."""

    def __init__(self, allowed: tuple[str, ...] | list[str] = ()):
        self.entries = tuple(allowed)
        self._allowed = [parse_allowed(entry) for entry in self.entries]

    def refusal(self, host: str, port: int, address: IPAddress) -> str:
        """Why connecting to ``address`` for ``host:port`` is refused ("" when it is not)."""
        kind = non_public_kind(address)
        if not kind or any(allowed.admits(host, port, address) for allowed in self._allowed):
            return ""
        shown = host if host == str(address) else f"{host} ({address})"
        entry = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        article = "an" if kind[0] in "aeiou" else "a"
        return (f"refused: {shown} is {article} {kind} address, and the crawl fetches only public addresses unless "
                f"{ALLOW_KEY} names the host (now {list(self.entries)}); add '{entry}' there if this "
                f"source is yours")

    def checked_addresses(self, host: str, port: int) -> list[str]:
        """The addresses ``host`` resolves to, every one of them allowed; RefusedURL otherwise.

        A name that resolves to a public and a private address is refused: which one a
        connection would get is the resolver's choice, not ours.
        """
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            reason = self.refusal(host, port, ipaddress.ip_address(address.split("%", 1)[0]))
            if reason:
                raise RefusedURL(reason, while_key=ALLOW_KEY)
        return addresses

    def check_url(self, url: str) -> None:
        """RefusedURL if ``url`` is not http(s) or its host resolves to an address not allowed."""
        host, port = target_of(url)
        try:
            self.checked_addresses(host, port)
        except (socket.gaierror, UnicodeError):
            pass  # a name that does not resolve fails as the request's own connection error, tried again later

    def adapter(self) -> HTTPAdapter:
        """A requests adapter whose connections go only to addresses this policy allows."""
        return _GuardedAdapter(self)


class _CheckedConnect:
    """Mixed into urllib3's connections: resolve, check every address, connect to a checked one."""

    policy: AddressPolicy

    def _new_conn(self):
        try:
            addresses = self.policy.checked_addresses(self.host, self.port)
        except socket.gaierror as error:
            raise NameResolutionError(self.host, self, error) from error
        resolved_name = self._dns_host
        error = None
        for address in addresses:
            # _dns_host is the name urllib3 looks up; the checked address instead makes the
            # lookup a no-op, while self.host (TLS server name, Host header) stays the URL's
            self._dns_host = address
            try:
                return super()._new_conn()
            except (NewConnectionError, ConnectTimeoutError) as failure:  # the next address, if any
                error = failure
            finally:
                self._dns_host = resolved_name
        raise error


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, policy: AddressPolicy):
        self.policy = policy
        super().__init__()

    def send(self, request, *args, **kwargs):
        # requests sends every request of a session through its adapter's send(), proxied ones
        # too; their connections come from proxy_manager_for() and go to the proxy, so the
        # checked connections below never see the target: this check is their only one
        self.policy.check_url(request.url)
        return super().send(request, *args, **kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        pools = {}
        for scheme, pool_cls, connection_cls in (("http", HTTPConnectionPool, HTTPConnection),
                                                 ("https", HTTPSConnectionPool, HTTPSConnection)):
            checked = type(f"Checked{connection_cls.__name__}", (_CheckedConnect, connection_cls),
                           {"policy": self.policy})
            pools[scheme] = type(f"Checked{pool_cls.__name__}", (pool_cls,), {"ConnectionCls": checked})
        self.poolmanager.pool_classes_by_scheme = pools
