"""uvicorn around the app: the process ``vledge serve`` runs."""

from __future__ import annotations

import logging
import socket

import uvicorn

from vledge.errors import ConfigError
from vledge.serve.app import create_app
from vledge.serve.options import ServeOptions

log = logging.getLogger(__name__)


def build_server(model, options: ServeOptions, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``model``; ``server.run()`` blocks, ``server.should_exit = True`` stops it.

    The HTTP parser is h11 with its incomplete-event limit set to ``max_header_bytes``: a request line and
    headers larger than that close the connection before any route runs.
    """
    if not options.loopback:
        log.warning("serving on %s: reachable from other machines%s", options.host,
                    "" if options.api_key else " and without an API key")
    config = uvicorn.Config(create_app(model, options), host=options.host, port=options.port, log_level=log_level,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=5, http="h11",
                            h11_max_incomplete_event_size=options.max_header_bytes)
    return uvicorn.Server(config)


def listen(options: ServeOptions) -> socket.socket:
    """The bound listening socket for ``options.host:options.port``; a busy port or bad address is a ConfigError.

    Bound before the model loads, so a port in use is reported at once, as one line.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(options.host, options.port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"cannot resolve the address {options.host!r}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}") from None
    return sock


def serve(model, options: ServeOptions, log_level: str = "warning", sock: socket.socket | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM finish the requests in flight, then stop)."""
    server = build_server(model, options, log_level)
    sock = sock if sock is not None else listen(options)
    with sock:
        server.run(sockets=[sock])
