"""Constrained output: ``response_format`` (``json_object``, ``json_schema``) and forced tool calls, as
GBNF grammars for the worker's grammar sampler (llama-cpp-python's JSON-schema converter)."""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from erllama.gateway.errors import bad_param


def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The grammar for an OpenAI ``response_format`` (None for ``text`` or none)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_GBNF
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_param("response_format.json_schema.schema", "A JSON schema object is required.")
        return schema_grammar(schema, "response_format.json_schema.schema")
    raise bad_param("response_format.type", f"Unsupported response_format type {kind!r}.")


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except (ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise bad_param(param, f"This JSON schema cannot be turned into a grammar: {exc}") from None


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of one call to any of ``tools``: ``{"name": <a tool's name>, "arguments": {...}}``."""
    calls = []
    for t in tools:
        fn = t["function"]
        arguments = fn.get("parameters") or {"type": "object"}
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": arguments},
                "required": ["name", "arguments"],
            }
        )
    return calls[0] if len(calls) == 1 else {"oneOf": calls}
