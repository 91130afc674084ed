"""Exact replay for ``/v1/chat/completions``: an OpenAI conversation's identity per message, so that an
assistant message (with its ``tool_calls`` ids) sent back is rebuilt from its record (gateway/replay.py)."""

from __future__ import annotations

from typing import Any

from erllama.gateway.replay import Conversation


def openai_identity(message: dict[str, Any]) -> dict[str, Any]:
    """What identifies a message: role, text, tool calls (id, name, arguments text), the call answered."""
    calls = [
        [c.get("id"), (c.get("function") or {}).get("name"), (c.get("function") or {}).get("arguments")]
        for c in message.get("tool_calls") or []
        if isinstance(c, dict)
    ]
    return {
        "role": message.get("role"),
        "content": message.get("content") or "",
        "tool_calls": calls,
        "tool_call_id": message.get("tool_call_id"),
    }


def openai_conversation(
    model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> Conversation:
    return Conversation(model, None, tools, messages, [openai_identity(m) for m in messages])
