"""Rendering a conversation with the model's own chat template (GGUF ``tokenizer.chat_template``).

The Jinja2 environment matches llama-cpp-python's ``Jinja2ChatFormatter`` (itself aligned with
Hugging Face Transformers): an ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a pass-through ``{% generation %}`` tag, a
``tojson`` filter that keeps non-ASCII text, and the globals ``raise_exception`` and
``strftime_now``. The same messages therefore render to the same text here and there.

``system`` and ``tools`` are folded into the conversation the way erllama does it: one system
message at the front whose content is ``system``, then a blank line and ``Available tools:`` with
one ``  - name: description`` line per tool (and a ``    parameters: {json}`` line when the tool
has a schema). A leading system message already in ``messages`` is kept, after that text. If the
template itself reads a ``tools`` variable, it knows its own tool syntax better than any fold can,
so the tools are passed to it (in OpenAI form) and left out of the system message instead.

Errors are ``ErllamaError`` with a string code: ``invalid_content`` (content given as a list of
blocks), ``invalid_params`` (malformed messages or tools, or the template called
``raise_exception`` about them), ``no_template`` (the model has none) and ``template_failed``
(the template does not compile, or fails for reasons of its own while rendering).
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import datetime
from typing import Any, Final

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from erllama.protocol import ErllamaError, ErrorCode

log = logging.getLogger(__name__)

ERR_INVALID_CONTENT: Final = "invalid_content"
ERR_NO_TEMPLATE: Final = "no_template"
ERR_TEMPLATE_FAILED: Final = "template_failed"

MAX_MESSAGES: Final = 4096
MAX_ROLE_CHARS: Final = 64
MAX_CONTENT_BYTES: Final = 16 * 1024 * 1024  # all contents together; a client frame cannot carry more
MAX_TOOLS: Final = 128
MAX_TOOLS_JSON_BYTES: Final = 1024 * 1024
MAX_TEMPLATE_CHARS: Final = 1024 * 1024
MAX_RENDERED_CHARS: Final = 64 * 1024 * 1024  # a runaway template loop fails instead of eating memory
COMPILED_TEMPLATES_CACHED: Final = 16  # one per model a worker has served is plenty
ALLOWED_MESSAGE_KEYS: Final = frozenset({"role", "content", "name", "tool_call_id", "tool_calls"})
TOOLS_HEADER: Final = "Available tools:"


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Pass-through for Hugging Face's ``{% generation %}`` tag (as llama-cpp-python does)."""

    tags = {"generation"}  # noqa: RUF012 - jinja2 declares it so, and reads it from the class

    def parse(self, parser: Parser) -> list[jinja2.nodes.Node]:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateRaised(Exception):
    """``raise_exception(msg)`` inside a template: the template refusing the conversation it got."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _bad(why: str) -> ErllamaError:
    return ErllamaError(ErrorCode.INVALID_PARAMS, why)


class ChatTemplate:
    """One compiled chat template. Compile once per model; ``render`` is thread-safe."""

    __slots__ = ("_compiled", "bos_token", "eos_token", "source", "uses_tools")

    def __init__(self, template: str | None, *, bos_token: str, eos_token: str):
        if not template or not template.strip():
            raise ErllamaError(ERR_NO_TEMPLATE, "the model has no chat template")
        if len(template) > MAX_TEMPLATE_CHARS:
            raise ErllamaError(
                ERR_TEMPLATE_FAILED, f"the chat template is longer than {MAX_TEMPLATE_CHARS} chars"
            )
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        try:
            ast = env.parse(template)
            self._compiled = env.from_string(template)
        except jinja2.TemplateError as exc:
            raise ErllamaError(ERR_TEMPLATE_FAILED, f"the chat template does not compile: {exc}") from None
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.uses_tools = "tools" in jinja2.meta.find_undeclared_variables(ast)

    def render(
        self,
        messages: Any,
        *,
        system: str | None = None,
        tools: Any = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text for ``messages`` (validated here), with ``system`` and ``tools`` folded in."""
        msgs = validate_messages(messages)
        if system is not None and not isinstance(system, str):
            raise _bad("system: expected a string")
        norm_tools = validate_tools(tools)
        fold_tools = norm_tools if not self.uses_tools else []
        msgs = _fold_system(msgs, system, fold_tools)
        if not isinstance(add_generation_prompt, bool):
            raise _bad("add_generation_prompt: expected true or false")
        try:
            text = self._compiled.render(
                messages=msgs,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                raise_exception=_raise_exception,
                add_generation_prompt=add_generation_prompt,
                functions=None,
                function_call=None,
                tools=norm_tools if (self.uses_tools and norm_tools) else None,
                tool_choice=None,
                strftime_now=_strftime_now,
            )
        except _TemplateRaised as exc:
            # The template's own verdict on the conversation (e.g. "roles must alternate"): the caller's to fix.
            raise _bad(f"the chat template rejected the conversation: {exc}") from None
        except (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            KeyError,
            IndexError,
            AttributeError,
            ArithmeticError,
            RecursionError,
            OverflowError,
        ) as exc:
            # Anything else a template can raise while rendering is the template's (the model file's) fault.
            log.warning("chat template failed: %s: %s", type(exc).__name__, exc)
            raise ErllamaError(
                ERR_TEMPLATE_FAILED, f"the chat template failed: {type(exc).__name__}: {exc}"
            ) from None
        if len(text) > MAX_RENDERED_CHARS:
            raise ErllamaError(ERR_TEMPLATE_FAILED, f"the rendered prompt exceeds {MAX_RENDERED_CHARS} chars")
        return text


@functools.lru_cache(maxsize=COMPILED_TEMPLATES_CACHED)
def _compiled(template: str, bos_token: str, eos_token: str) -> ChatTemplate:
    return ChatTemplate(template, bos_token=bos_token, eos_token=eos_token)


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    system: str | None,
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
) -> str:
    """Render ``messages`` with ``template`` (compiled once and cached); see the module docstring."""
    if not template or not isinstance(template, str) or not template.strip():
        raise ErllamaError(ERR_NO_TEMPLATE, "the model has no chat template")
    return _compiled(template, bos_token, eos_token).render(
        messages, system=system, tools=tools, add_generation_prompt=add_generation_prompt
    )


# --- validation ---------------------------------------------------------------------------------------------


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation; return shallow copies so a template can never see a caller's objects change.

    Each message is a dict with a non-empty str ``role`` and a str ``content``; optional ``name``
    and ``tool_call_id`` (str) and ``tool_calls`` (a list, for templates that render them).
    Content given as a list of blocks is ``invalid_content``: only plain text is supported.
    """
    if not isinstance(messages, list):
        raise _bad("messages: expected a list")
    if not messages:
        raise _bad("messages: the conversation is empty")
    if len(messages) > MAX_MESSAGES:
        raise _bad(f"messages: at most {MAX_MESSAGES} messages")
    total = 0
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where}: expected a map")
        unknown = set(m) - ALLOWED_MESSAGE_KEYS
        if unknown:
            raise _bad(f"{where}: unknown key {min(map(str, unknown))!r}")
        role = m.get("role")
        if not isinstance(role, str) or not role or len(role) > MAX_ROLE_CHARS:
            raise _bad(f"{where}.role: expected a non-empty string of at most {MAX_ROLE_CHARS} chars")
        content = m.get("content")
        if isinstance(content, list):
            raise ErllamaError(
                ERR_INVALID_CONTENT, f"{where}.content: content blocks are not supported, send text"
            )
        if not isinstance(content, str):
            raise _bad(f"{where}.content: expected a string")
        total += len(content.encode("utf-8", errors="surrogatepass"))
        if total > MAX_CONTENT_BYTES:
            raise _bad(f"messages: contents exceed {MAX_CONTENT_BYTES} bytes")
        for key in ("name", "tool_call_id"):
            if key in m and not isinstance(m[key], str):
                raise _bad(f"{where}.{key}: expected a string")
        if "tool_calls" in m:
            if not isinstance(m["tool_calls"], list):
                raise _bad(f"{where}.tool_calls: expected a list")
            total += _json_size(m["tool_calls"], f"{where}.tool_calls")
        out.append(dict(m))
    return out


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """Normalize tools to OpenAI form ``{"type": "function", "function": {name, description, parameters}}``.

    Accepted input: that form, or erllama's ``{name, description, schema}`` (``parameters`` is an
    alias of ``schema``). ``None`` means no tools.
    """
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad("tools: expected a list")
    if len(tools) > MAX_TOOLS:
        raise _bad(f"tools: at most {MAX_TOOLS} tools")
    out: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise _bad(f"{where}: expected a map")
        fn = t.get("function") if t.get("type") == "function" else t
        if not isinstance(fn, dict):
            raise _bad(f"{where}.function: expected a map")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"{where}: a tool needs a non-empty string name")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise _bad(f"{where}.description: expected a string")
        params = fn.get("parameters", fn.get("schema"))
        if params is not None and not isinstance(params, dict):
            raise _bad(f"{where}.parameters: expected a JSON schema map")
        norm: dict[str, Any] = {"name": name, "description": desc}
        if params is not None:
            norm["parameters"] = params
        out.append({"type": "function", "function": norm})
    _json_size(out, "tools")
    return out


def _json_size(value: Any, where: str) -> int:
    try:
        n = len(json.dumps(value, ensure_ascii=False).encode("utf-8", errors="surrogatepass"))
    except (TypeError, ValueError):
        raise _bad(f"{where}: must be plain JSON data") from None
    if n > MAX_TOOLS_JSON_BYTES:
        raise _bad(f"{where}: larger than {MAX_TOOLS_JSON_BYTES} bytes")
    return n


def tools_listing(tools: list[dict[str, Any]]) -> str:
    """erllama's plain-text tool list: ``Available tools:`` then ``  - name: description`` per tool."""
    lines = [TOOLS_HEADER]
    for t in tools:
        fn = t["function"]
        lines.append(f"  - {fn['name']}: {fn['description']}")
        if "parameters" in fn:
            lines.append(
                f"    parameters: {json.dumps(fn['parameters'], ensure_ascii=False, sort_keys=True)}"
            )
    return "\n".join(lines)


def _fold_system(
    msgs: list[dict[str, Any]], system: str | None, tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    parts = [p for p in (system, tools_listing(tools) if tools else None) if p]
    if not parts:
        return msgs
    if msgs[0]["role"] == "system":
        # One system message, not two: many templates only honour messages[0] as the system prompt.
        first = dict(msgs[0])
        first["content"] = "\n\n".join([*parts, first["content"]]) if first["content"] else "\n\n".join(parts)
        return [first, *msgs[1:]]
    return [{"role": "system", "content": "\n\n".join(parts)}, *msgs]
