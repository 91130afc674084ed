"""``GET /health`` (200 once the broker answers a ping, 503 otherwise) and ``GET /metrics``."""

from __future__ import annotations

import asyncio
from typing import Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from erllama.gateway.metrics import CONTENT_TYPE
from erllama.gateway.openai_common import backend_of
from erllama.protocol import ErllamaError

HEALTH_PING_TIMEOUT_S: Final = 2.0


async def health(request: Request) -> Response:
    client = backend_of(request).client
    try:
        await asyncio.wait_for(client.ping(), HEALTH_PING_TIMEOUT_S)
    except (ErllamaError, TimeoutError) as err:
        return JSONResponse({"status": "unavailable", "error": str(err)}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    backend = backend_of(request)
    return Response(await backend.metrics.render(backend.client.list_models), media_type=CONTENT_TYPE)
