"""A Fleet gateway: the one public port of a SuperLink host, for SuperNodes only.

Flower 1.41's SuperLink serves three APIs on one HTTP port: the Fleet API
(``/v1/fleet/*``, SuperNodes), the Control API (``/v1/control/*``, the `flwr`
CLI; the open-source SuperLink authenticates no user) and the Runtime API
(``/v1/runtime/*``, its own ServerApp). Whoever reaches that port can
``flwr run`` an app of their own, which then runs on the SuperLink and on every
SuperNode. So the SuperLink listens on loopback only, and this gateway, in
front of it on the public address:

- terminates TLS with the SuperLink's own certificate (SuperNodes verify it
  against the federation's CA, as they would the SuperLink);
- forwards exactly the Fleet API calls a SuperNode makes (``POST`` to one of
  ``FLEET_PATHS``) to the loopback SuperLink over TLS, headers unchanged
  (SuperNode authentication signs them; the SuperLink checks the signature);
- answers 403 to anything else (the Control and Runtime APIs, ``/docs``, any
  other method or path) and logs the refusal;
- bounds what it accepts: a request body must state its length
  (``Content-Length``) and stay under ``--max-body-mb``; a client that opens
  a connection and sends no request, or stops sending its body, is cut off
  after ``--timeout`` seconds, and so is a SuperLink that does not answer; one
  client address holds at most ``--max-connections-per-peer`` connections, so
  one participant cannot take every connection the gateway can hold.

``python -m deploy.gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093
--certfile superlink.crt --keyfile superlink.key --root-certificates ca.crt``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from flwr.supercore.address import parse_address
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

# Every call of Flower 1.41's SuperNode (flwr/supernode/fleet_http_client.py), all
# POST with a protobuf body; tests/test_deploy.py checks this against the routes
# of the SuperLink's Fleet router.
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received",
))
# A Fleet request carries one message or one object (arrays travel in chunks of
# 5 MB); fedgan's largest is far below this.
DEFAULT_MAX_BODY_MB = 256
DEFAULT_TIMEOUT = 120.0  # seconds; SuperNodes' own calls time out after 30 s
# A SuperNode holds up to 4 at once (its main loop, heartbeats, 2 object transfers).
DEFAULT_MAX_CONNECTIONS_PER_PEER = 32
# Connection-level headers, and forwarding headers a client could forge: the
# gateway sets X-Forwarded-For itself (the SuperLink's uvicorn trusts it from
# loopback, so its log shows the SuperNode's own address).
_DROPPED_HEADERS = frozenset({
    "host", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "forwarded", "x-forwarded-for",
    "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "x-real-ip",
})
_LOGGED_CHARS = 120  # a refused path is hostile input: the log quotes a prefix
log = logging.getLogger("fedgan.gateway")


def create_app(superlink: str, root_certificates: Path,
               max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2**20,
               timeout: float = DEFAULT_TIMEOUT) -> Starlette:
    """The gateway's ASGI app, forwarding Fleet calls to `superlink` ("host:port") over TLS.

    `root_certificates` is the CA that signed the SuperLink's certificate.
    """
    verify = ssl.create_default_context(cafile=str(root_certificates))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=f"https://{superlink}", verify=verify,
                                     timeout=timeout) as client:
            app.state.client = client
            yield

    async def forward(request: Request) -> Response:
        path = request.url.path  # percent-decoded; only exact Fleet paths pass
        if request.method != "POST" or path not in FLEET_PATHS:
            return _refuse(request, 403, "not a Fleet API call")
        if request.url.query:
            return _refuse(request, 403, "a Fleet API call has no query")
        length = request.headers.get("content-length", "")
        if not length.isdigit():  # also refuses chunked bodies of unknown length
            return _refuse(request, 411, "no Content-Length")
        if int(length) > max_body_bytes:
            return _refuse(request, 413, f"body of {length} bytes over {max_body_bytes}")
        headers = [(k, v) for k, v in request.headers.items() if k not in _DROPPED_HEADERS]
        peer_host = request.client.host if request.client else ""
        headers += [("x-forwarded-for", peer_host), ("x-forwarded-proto", "https")]
        client: httpx.AsyncClient = request.app.state.client
        outgoing = client.build_request("POST", path, headers=headers,
                                        content=_body(request, timeout))
        try:
            reply = await client.send(outgoing, stream=True)
        except (httpx.HTTPError, TimeoutError, ClientDisconnect) as exc:
            log.warning("POST %s from %s failed: %s", path, _peer(request), type(exc).__name__)
            return PlainTextResponse("the SuperLink did not answer\n", status_code=502)
        log.debug("POST %s from %s -> %d", path, _peer(request), reply.status_code)
        return StreamingResponse(
            reply.aiter_raw(), status_code=reply.status_code,
            headers={k: v for k, v in reply.headers.items() if k not in _DROPPED_HEADERS},
            background=BackgroundTask(reply.aclose))

    return Starlette(routes=[Route("/{path:path}", _EveryMethod(forward))], lifespan=lifespan)


class _EveryMethod:
    """An ASGI app answering every request with `handler(request)`, whatever its method.

    (Starlette routes a plain function for GET only, and answers other methods
    405 itself, unlogged.)
    """

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Build the request, call the handler, send its response."""
        response = await self.handler(Request(scope, receive))
        await response(scope, receive, send)


async def _body(request: Request, idle_timeout: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; TimeoutError if the client stalls."""
    chunks = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        yield chunk


def _peer(request: Request) -> str:
    """The client's address as "host:port"."""
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def _short(text: str) -> str:
    """`text` quoted, cut to its first _LOGGED_CHARS characters."""
    return repr(text[:_LOGGED_CHARS]) + ("..." if len(text) > _LOGGED_CHARS else "")


def _refuse(request: Request, status: int, reason: str) -> Response:
    """Log and answer a request the gateway does not forward."""
    log.warning("refused %s %s from %s (%d: %s)", _short(request.method),
                _short(request.url.path), _peer(request), status, reason)
    return PlainTextResponse(f"refused by the Fleet gateway: {reason}\n", status_code=status)


def serve(listen: str, superlink: str, certfile: Path, keyfile: Path,
          root_certificates: Path, max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2**20,
          timeout: float = DEFAULT_TIMEOUT,
          max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER) -> None:
    """Run the gateway on `listen` ("host:port") until SIGINT or SIGTERM."""
    host, port = _host_port(listen)
    app = create_app(superlink, root_certificates, max_body_bytes, timeout)
    log.info("Fleet gateway on %s:%d (TLS) -> https://%s, Fleet API only", host, port,
             superlink)
    uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile),
        # uvicorn's h11 protocol (it bounds a request's head to 16 KiB), limited per peer
        http=_peer_limited_h11(max_connections_per_peer, timeout),
        proxy_headers=False,  # a client's X-Forwarded-For is never believed
        server_header=False, access_log=False, log_level="warning",
        timeout_keep_alive=30, timeout_graceful_shutdown=5,
    )).run()


def _peer_limited_h11(max_per_peer: int, first_request_timeout: float) -> type[H11Protocol]:
    """Uvicorn's HTTP/1.1 connection class, at most `max_per_peer` open per client address.

    A connection that sends no request within `first_request_timeout` seconds
    is closed (uvicorn times out idle connections only between requests).
    """
    open_by_peer: Counter[str] = Counter()

    class PeerLimitedH11(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.peer = self.client[0] if self.client else "?"
            open_by_peer[self.peer] += 1
            if open_by_peer[self.peer] > max_per_peer:
                log.warning("refused a connection from %s: %d open already", self.peer,
                            max_per_peer)
                transport.close()
            else:
                self.timeout_keep_alive_task = self.loop.call_later(
                    first_request_timeout, self.timeout_keep_alive_handler)

        def connection_lost(self, exc: Exception | None) -> None:
            open_by_peer[self.peer] -= 1
            super().connection_lost(exc)

    return PeerLimitedH11


def _host_port(address: str) -> tuple[str, int]:
    """Split "host:port" ("[::]:9092" for IPv6)."""
    parsed = parse_address(address)
    if not parsed:
        raise ValueError(f"not a host:port address: {address!r}")
    host, port, _ = parsed
    return host, port


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the Fleet gateway."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.gateway",
        description="Forward SuperNodes' Fleet API calls to a SuperLink on loopback; "
                    "refuse everything else (the Control and Runtime APIs).")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="public address, e.g. 0.0.0.0:9092 (SuperNodes' --superlink)")
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT",
                        help="the SuperLink on loopback, e.g. 127.0.0.1:9093")
    parser.add_argument("--certfile", type=Path, required=True,
                        help="the SuperLink's TLS certificate (superlink.crt)")
    parser.add_argument("--keyfile", type=Path, required=True,
                        help="its private key (superlink.key)")
    parser.add_argument("--root-certificates", type=Path, required=True,
                        help="the CA certificate that signed it (ca.crt)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                        help=f"largest request body forwarded (default: {DEFAULT_MAX_BODY_MB})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds a stalled client or SuperLink is waited for "
                             f"(default: {DEFAULT_TIMEOUT:.0f})")
    parser.add_argument("--max-connections-per-peer", type=int,
                        default=DEFAULT_MAX_CONNECTIONS_PER_PEER,
                        help="connections one client address may hold open "
                             f"(default: {DEFAULT_MAX_CONNECTIONS_PER_PEER})")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"],
                        help="DEBUG logs every forwarded call (default: INFO)")
    args = parser.parse_args(argv)
    if min(args.max_body_mb, args.timeout, args.max_connections_per_peer) <= 0:
        parser.error("--max-body-mb, --timeout and --max-connections-per-peer must be > 0")
    for name in ("listen", "superlink"):
        try:
            _host_port(getattr(args, name))
        except ValueError as exc:
            parser.error(f"--{name}: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(args.log_level)
    for noisy in ("httpx", "httpcore"):  # one line per forwarded call at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    serve(args.listen, args.superlink, args.certfile, args.keyfile, args.root_certificates,
          int(args.max_body_mb * 2**20), args.timeout, args.max_connections_per_peer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
