"""uvicorn around the app: the process ``vledge serve`` runs."""

from __future__ import annotations

import logging
import socket

import uvicorn

from vledge.serve.app import create_app
from vledge.serve.options import ServeOptions

log = logging.getLogger(__name__)


def build_server(model, options: ServeOptions, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``model``; ``server.run()`` blocks, ``server.should_exit = True`` stops it."""
    if not options.loopback:
        log.warning("serving on %s: reachable from other machines%s", options.host,
                    "" if options.api_key else " and without an API key")
    config = uvicorn.Config(create_app(model, options), host=options.host, port=options.port, log_level=log_level,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(model, options: ServeOptions, log_level: str = "warning", sock: socket.socket | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM finish the requests in flight, then stop)."""
    server = build_server(model, options, log_level)
    server.run(sockets=[sock] if sock is not None else None)
