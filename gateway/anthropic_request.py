"""An Anthropic Messages request as typed structs, and as the conversation the chat template renders.

``system`` (a string or text blocks) becomes the template's system text, with the configured pattern
(Claude Code's per-request billing line) removed so that it does not change the prompt's first tokens
every request. ``tool_result`` blocks become ``tool`` messages; ``tool_use`` blocks become the model's
own tool-call syntax (its ``tool_call_markers`` around ``{"name", "arguments"}``, the form the model
writes them in), or OpenAI ``tool_calls`` for a model without markers; ``thinking`` blocks are left out
of the rendering (templates drop earlier turns' reasoning) but are part of the message's identity for
replay. Images and documents are a 400: no loaded model here reads them.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import msgspec

from erllama.gateway.errors import ApiError, bad_param
from erllama.gateway.replay import Conversation

UNSUPPORTED_BLOCKS: Final = frozenset({"image", "document", "search_result", "container_upload"})


class MessagesRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/messages``. Unknown fields are ignored, as coding agents send newer ones freely;
    ``grammar`` (GBNF) is the llama.cpp extension the OpenAI endpoints take too."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    stream: bool = False
    grammar: str | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/messages/count_tokens``: a Messages request without the generation settings."""

    model: str
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


def system_text(system: str | list[dict[str, Any]] | None, normalize: str | None) -> str | None:
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) else (system or [])
    texts = []
    for i, block in enumerate(blocks):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_param(f"system[{i}]", "System blocks must be text blocks.")
        text = re.sub(normalize, "", block["text"]) if normalize else block["text"]
        if text:
            texts.append(text)
    return "\n\n".join(texts) if texts else None


def openai_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Anthropic tool definitions in the OpenAI form the template and the grammar helpers take."""
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise bad_param(f"tools[{i}].name", "A tool needs a name.")
        if t.get("type") not in (None, "custom"):
            continue  # Anthropic's server tools (web search, ...) run at Anthropic; none here
        fn: dict[str, Any] = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object"}}
        if t.get("description"):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out or None


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for i, block in enumerate(content or []):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in UNSUPPORTED_BLOCKS:
            raise _unsupported(kind, f"{where}[{i}]")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise bad_param(f"{where}[{i}]", f"Unsupported content block {kind!r} here.")
        texts.append(block["text"])
    return "".join(texts)


def _unsupported(kind: str, where: str) -> ApiError:
    return bad_param(where, f"{kind} blocks are not supported: the model served here reads text only.")


def tool_call_text(name: str, arguments: Any, markers: dict[str, str] | None) -> str:
    """A call as the model writes it between its markers (gateway/tools.py parses this form)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{markers.get('start', '')}{call}{markers.get('end', '')}" if markers else call


def _user(content: Any, where: str) -> list[tuple[dict[str, Any], Any]]:
    """A user message: its tool results as ``tool`` messages, then its text (if any)."""
    if isinstance(content, str):
        m = {"role": "user", "content": content}
        return [(m, m)]
    out: list[tuple[dict[str, Any], Any]] = []
    texts = []
    for i, block in enumerate(content or []):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in UNSUPPORTED_BLOCKS:
            raise _unsupported(str(kind), f"{where}[{i}]")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_result" and isinstance(block.get("tool_use_id"), str):
            text = _text_of(block.get("content", ""), f"{where}[{i}].content")
            if block.get("is_error"):
                text = f"Error: {text}"
            m = {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}
            out.append((m, m))
        else:
            raise bad_param(f"{where}[{i}]", f"Unsupported content block {kind!r} in a user message.")
    if texts:
        m = {"role": "user", "content": "".join(texts)}
        out.append((m, m))
    return out


def _assistant(
    content: Any, where: str, markers: dict[str, str] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An assistant message in template form, and its identity for replay."""
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else (content or [])
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    thinking: list[list[str]] = []
    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and isinstance(block.get("name"), str):
            calls.append({"id": str(block.get("id", "")), "name": block["name"], "input": block.get("input")})
        elif kind == "thinking":
            thinking.append([str(block.get("thinking", "")), str(block.get("signature", ""))])
        elif kind == "redacted_thinking":
            thinking.append(["", str(block.get("data", ""))])
        elif kind in UNSUPPORTED_BLOCKS:
            raise _unsupported(str(kind), f"{where}[{i}]")
        else:
            raise bad_param(f"{where}[{i}]", f"Unsupported content block {kind!r} in an assistant message.")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if markers:
        message["content"] += "".join(tool_call_text(c["name"], c["input"], markers) for c in calls)
    elif calls:
        message["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["input"], ensure_ascii=False)},
            }
            for c in calls
        ]
    return message, {"m": message, "ids": [c["id"] for c in calls], "thinking": thinking}


def conversation(
    model: str,
    system: str | list[dict[str, Any]] | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    normalize: str | None,
    markers: dict[str, str] | None,
) -> Conversation:
    """The request's messages as the template renders them, each with its replay identity."""
    rendered: list[dict[str, Any]] = []
    canon: list[Any] = []
    for i, m in enumerate(messages):
        role, where = m.get("role") if isinstance(m, dict) else None, f"messages[{i}].content"
        if role == "user":
            pairs = _user(m.get("content"), where)
        elif role == "assistant":
            pairs = [_assistant(m.get("content"), where, markers)]
        else:
            raise bad_param(f"messages[{i}].role", "A message's role is user or assistant.")
        for message, identity in pairs:
            rendered.append(message)
            canon.append(identity)
    if not rendered:
        raise bad_param("messages", "At least one message is required.")
    return Conversation(model, system_text(system, normalize), openai_tools(tools), rendered, canon)


def reply_identity(blocks: list[dict[str, Any]], markers: dict[str, str] | None) -> Any:
    """The identity the reply's own blocks will have when the client sends them back."""
    return _assistant(blocks, "reply", markers)[1]
