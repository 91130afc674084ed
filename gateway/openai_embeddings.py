"""``POST /v1/embeddings``: one or several inputs (text or token ids), as floats or base64 (little-endian
float32, what the ``openai`` SDK asks for by default)."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from erllama.gateway.errors import bad_param
from erllama.gateway.openai_common import backend_of, track
from erllama.gateway.parsing import decode_body

ENDPOINT = "embeddings"


class EmbeddingRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str | list[Any]  # text, token ids, or a list of either (checked by inputs_of)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def inputs_of(value: str | list[Any]) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise bad_param("input", "input must not be empty.")
    items: list[Any] = [value] if isinstance(value[0], int) else value
    for i, item in enumerate(items):
        ok = isinstance(item, str) or (
            isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        )
        if not ok or not item:
            raise bad_param(f"input[{i}]", "Each input is a non-empty string or list of token ids.")
    return items


async def embeddings(request: Request) -> Response:
    backend = backend_of(request)
    req = decode_body(await request.body(), EmbeddingRequest)
    track(request, req.model, ENDPOINT)
    if req.dimensions is not None:
        raise bad_param("dimensions", "dimensions is not supported by this server.", "unsupported_parameter")
    inputs = inputs_of(req.input)
    client = backend.client
    vectors = await asyncio.gather(*(client.embed(req.model, x) for x in inputs))
    texts = [x for x in inputs if isinstance(x, str)]
    counted = await asyncio.gather(*(client.tokenize(req.model, t) for t in texts))
    n = sum(len(ids) for ids in counted) + sum(len(x) for x in inputs if not isinstance(x, str))
    data = []
    for i, vec in enumerate(vectors):
        embedding: Any = vec
        if req.encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    backend.metrics.requests.labels(req.model, ENDPOINT, "finished").inc()
    return JSONResponse(
        {"object": "list", "data": data, "model": req.model, "usage": {"prompt_tokens": n, "total_tokens": n}}
    )
