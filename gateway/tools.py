"""Tool calls for ``/v1/chat/completions``.

``tool_choice`` ``required`` or a named function forces a call: the reply is constrained by a grammar
to ``{"name": ..., "arguments": {...}}`` (one of the offered tools, arguments per its schema) and the
whole reply is the call. ``auto`` lets the model decide: the calls are the spans between the model's
``tool_call_markers`` (a load option), each holding the same JSON. ``none`` offers the tools to the
template but never returns a call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from erllama.gateway.errors import bad_param
from erllama.gateway.grammar import schema_grammar, tool_call_schema


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_message(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None  # for the chat template
    grammar: str | None  # set when a call is forced
    auto: bool  # the model may call a tool on its own (markers)

    @property
    def forced(self) -> bool:
        return self.grammar is not None


def plan(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> ToolPlan:
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_param("tool_choice", "tool_choice needs tools.")
        return ToolPlan(None, None, False)
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise bad_param(f"tools[{i}]", "Each tool must be {'type': 'function', 'function': {...}}.")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_param(f"tools[{i}].function.name", "A tool needs a name.")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(tools, None, False)
    if choice == "auto":
        return ToolPlan(tools, None, True)
    if choice == "required":
        chosen = tools
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise bad_param("tool_choice", f"No tool named {name!r} among the tools.")
    else:
        raise bad_param("tool_choice", "tool_choice must be none, auto, required or a named function.")
    return ToolPlan(tools, schema_grammar(tool_call_schema(chosen), "tools"), False)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(text: str) -> ToolCall | None:
    """``{"name": ..., "arguments": ...}`` as a call (arguments as JSON text); None if it is not one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(new_call_id(), data["name"], arguments)


def strip_markers(span: str, markers: dict[str, str] | None) -> str:
    """A tool-call span's JSON: the text between its start and end markers."""
    if markers:
        start, end = markers.get("start", ""), markers.get("end", "")
        if start and span.startswith(start):
            span = span[len(start) :]
        if end and span.endswith(end):
            span = span[: -len(end)]
    return span.strip()
