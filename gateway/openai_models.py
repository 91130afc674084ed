"""``GET /v1/models`` and ``GET /v1/models/{id}``: the broker's loaded models, as OpenAI model objects, and
the configured aliases (``alias_of`` names the model serving them). A request with an
``anthropic-version`` header gets Anthropic's list form (``gateway/anthropic_models.py``)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from erllama.gateway.anthropic_models import anthropic_list, wants_anthropic
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
    backend = backend_of(request)
    models = await backend.client.list_models()
    by_id = {m["id"]: m for m in models}
    aliases = [
        {**model_object({**by_id[target], "id": pattern}), "alias_of": target}
        for pattern, target in backend.cfg.aliases
        if target in by_id
    ]
    if wants_anthropic(request):
        return anthropic_list([*models, *aliases])
    return JSONResponse({"object": "list", "data": [*(model_object(m) for m in models), *aliases]})


async def get_model(request: Request) -> Response:
    info = await backend_of(request).client.model_info(request.path_params["model"])
    return JSONResponse(model_object(info))
