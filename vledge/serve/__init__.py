"""``vledge serve``: an OpenAI-compatible HTTP server for a vledge model directory, with request batching.

Torch-free (the runtime, FastAPI and uvicorn from the ``[serve]`` extra).

    import vledge.runtime
    from vledge.serve import ServeOptions, serve
    serve(vledge.runtime.load("model/"), ServeOptions(port=8000, max_batch=8))

:mod:`~vledge.serve.options` holds the settings, :mod:`~vledge.serve.schemas` the wire format,
:mod:`~vledge.serve.images` the image part's decoding, :mod:`~vledge.serve.scheduler` the batching,
:mod:`~vledge.serve.metrics` the Prometheus metrics, :mod:`~vledge.serve.guard` the API key and body limit,
:mod:`~vledge.serve.app` the routes and :mod:`~vledge.serve.server` uvicorn.
"""

from vledge.serve.app import create_app
from vledge.serve.options import API_KEY_ENV, ServeOptions
from vledge.serve.server import build_server, serve

__all__ = ["API_KEY_ENV", "ServeOptions", "build_server", "create_app", "serve"]
