"""`safeguard serve`: an OpenAI-compatible HTTP server (the `[serve]` extra).

`create_app(backend, model_name=...)` builds the FastAPI app over any decoder (or the
batching engine); `safeguard serve` loads the models named on its command line and runs
the app with uvicorn. See docs/serving.md.
"""

from inference_safeguard.extras import import_extra

import_extra("fastapi", extra="serve", needed_by="safeguard serve")

from inference_safeguard.server.app import create_app
from inference_safeguard.server.backend import Backend

__all__ = ["Backend", "create_app"]
