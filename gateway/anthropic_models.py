"""``GET /v1/models`` in Anthropic's form (``{"data": [{"type": "model", "id", "display_name",
"created_at"}], "has_more", "first_id", "last_id"}``), for clients that send ``anthropic-version``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse


def wants_anthropic(request: Request) -> bool:
    return "anthropic-version" in request.headers


def anthropic_list(models: list[dict[str, Any]]) -> JSONResponse:
    data = [
        {
            "type": "model",
            "id": m["id"],
            "display_name": m.get("alias_of") or m["id"],
            "created_at": datetime.fromtimestamp(float(m.get("loaded_at") or m.get("created") or 0), UTC)
            .isoformat()
            .replace("+00:00", "Z"),
        }
        for m in models
    ]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return JSONResponse({"data": data, "has_more": False, "first_id": first, "last_id": last})
