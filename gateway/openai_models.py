"""``GET /v1/models`` and ``GET /v1/models/{id}``: the broker's loaded models, as OpenAI model objects."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from erllama.gateway.openai_common import backend_of


def model_object(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": info["id"],
        "object": "model",
        "created": int(info.get("loaded_at") or 0),
        "owned_by": "erllama",
        "state": info.get("state"),  # erllama's addition: loading, ready, restarting, failed
        "n_ctx": info.get("n_ctx"),
    }


async def list_models(request: Request) -> Response:
    models = await backend_of(request).client.list_models()
    return JSONResponse({"object": "list", "data": [model_object(m) for m in models]})


async def get_model(request: Request) -> Response:
    info = await backend_of(request).client.model_info(request.path_params["model"])
    return JSONResponse(model_object(info))
