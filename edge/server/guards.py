"""Transport guards: Host / Origin checks, a body read deadline (ASGI), a header read deadline (uvicorn protocol).

Why here and not in uvicorn flags: uvicorn bounds idle keep-alive connections and open connections
(`timeout_keep_alive`, `limit_concurrency`) and pings WebSockets, but it has no deadline for a request's
headers or body, so a client that sends one byte every few seconds holds a connection for ever. The header
deadline needs the protocol (no ASGI code runs before the headers are complete); the body deadline is ASGI.

Host / Origin (only when the listening socket is a loopback address and no API key is set, i.e. the default
"local assistant" setup, where the network cannot reach the server but any web page in the user's browser can
try to): the Host header must name a loopback host (or `--allowed-hosts`), which defeats DNS rebinding (a page
on evil.example whose name now resolves to 127.0.0.1 sends `Host: evil.example`); a request or socket that
carries an `Origin` must come from the server's own page (same scheme://host:port as the Host) or from
`--allowed-origins`. Clients that are not browsers send no Origin and are not affected.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from urllib.parse import urlsplit

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge.server.errors import APIError
from edge.server.settings import ServerSettings

log = logging.getLogger("edge.server")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
POLICY_VIOLATION = 1008  # WebSocket close code: refused by policy


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, str | None]:
    """'host:port' / '[v6]:port' / 'host' -> (host, port or None), lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        host, port = value.split(":")
        return host, port
    return value, None


class HostOriginMiddleware:
    """403 for a foreign Host or Origin on a loopback listener without a key (see the module docstring)."""

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.enabled = not settings.api_key
        self.hosts = set(LOOPBACK_NAMES) | set(settings.hosts)
        self.origins = set(settings.origins)

    def _problem(self, scope) -> str | None:
        server = scope.get("server")
        if not self.enabled or not server or not is_loopback(str(server[0])):
            return None
        headers = dict(scope.get("headers") or [])
        host_value = headers.get(b"host", b"").decode("latin-1")
        host, _ = _split_host(host_value)
        if host not in self.hosts and not is_loopback(host):
            return (f"Host {host_value!r} is not this server's name. The server listens on a loopback address "
                    "without an API key, so only loopback names are accepted (a guard against DNS rebinding); "
                    "use http://127.0.0.1:PORT, or start it with --allowed-hosts NAME or an --api-key.")
        origin = headers.get(b"origin")
        if origin is None:
            return None
        origin_value = origin.decode("latin-1").strip().rstrip("/").lower()
        if origin_value in self.origins:
            return None
        parts = urlsplit(origin_value)
        own_schemes = ("http", "https") if scope["type"] == "http" else ("http", "https", "ws", "wss")
        if parts.scheme in own_schemes and parts.netloc == host_value.strip().lower():
            return None  # the server's own page
        return (f"Origin {origin_value!r} may not use this server: only its own page (and --allowed-origins) "
                "may, when it listens on a loopback address without an API key. Start it with --allowed-origins "
                f"{origin_value} to allow that page.")

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        problem = self._problem(scope)
        if problem is None:
            return await self.app(scope, receive, send)
        log.info("refused %s %s: %s", scope["type"], scope.get("path"), problem)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": POLICY_VIOLATION})  # handshake answered 403
        err = APIError(403, problem, type="permission_error", code="origin_not_allowed")
        return await JSONResponse(err.body(), err.status)(scope, receive, send)


class BodyTimeoutError(APIError):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:.0f} s; send it at once (or "
                         "start the server with a larger --body-timeout).", code="body_timeout",
                         headers={"Connection": "close"})


class BodyDeadlineMiddleware:
    """The whole body must arrive within `seconds` of the request's start (408 otherwise)."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        done = False

        async def timed():
            nonlocal done
            if done:  # after the body only http.disconnect comes: no deadline
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyTimeoutError(self.seconds) from None
            if msg["type"] != "http.request" or not msg.get("more_body"):
                done = True
            return msg

        await self.app(scope, timed, send)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers (connection closed after it).

    The timer runs while h11 waits for a request (their_state IDLE): from the connection's start, and again from
    the first byte of each keep-alive request (uvicorn's keep-alive timer covers the silence before it)."""

    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closed a connection that sent no complete request headers within %.0f s", self.header_timeout)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_class(settings: ServerSettings) -> type[HeaderDeadlineProtocol]:
    """The protocol with this server's header deadline (a subclass per server: no shared mutable state)."""
    return type("ServerHeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": settings.header_timeout})


def uvicorn_options(settings: ServerSettings) -> dict:
    """The uvicorn.Config / uvicorn.run keyword arguments that carry the settings' timeouts and caps."""
    return {"http": protocol_class(settings), "timeout_keep_alive": settings.keep_alive_timeout,
            "limit_concurrency": settings.max_connections, "ws_ping_interval": settings.ws_ping_interval,
            "ws_ping_timeout": settings.ws_ping_timeout, "ws_max_size": settings.max_body_bytes}
