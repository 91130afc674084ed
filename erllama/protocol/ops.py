"""The arguments of each operation a client asks of a model's worker (``call`` -> ``op``), one typed
definition each: the client builds them, they travel as the message's ``args`` map, and the worker turns
the map into the operation's struct (``invalid_params`` naming the field otherwise) before it runs it.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from erllama.protocol.codes import WorkerOp


class OpArgs(msgspec.Struct, frozen=True):
    """Base of the argument structs; unknown keys are ignored, like unknown message fields."""


class TokenizeArgs(OpArgs, frozen=True):
    text: str
    add_special: bool = True
    parse_special: bool = False


class DetokenizeArgs(OpArgs, frozen=True):
    tokens: list[Any]  # checked against the model's vocabulary by the worker


class ChatTemplateArgs(OpArgs, frozen=True):
    messages: Any = None  # checked by the template renderer (invalid_content names what is wrong)
    system: str | None = None
    tools: Any = None
    add_generation_prompt: bool = True


class EmbedArgs(OpArgs, frozen=True):
    input: str | list[Any]  # text, or token ids checked against the vocabulary


class SessionArgs(OpArgs, frozen=True):
    session_id: str


class AdapterPathArgs(OpArgs, frozen=True):
    path: str


class AdapterArgs(OpArgs, frozen=True):
    handle: int


class AdapterScaleArgs(OpArgs, frozen=True):
    handle: int
    scale: float


class NoArgs(OpArgs, frozen=True):
    pass


OP_ARGS: Final[dict[WorkerOp, type[OpArgs]]] = {
    WorkerOp.TOKENIZE: TokenizeArgs,
    WorkerOp.DETOKENIZE: DetokenizeArgs,
    WorkerOp.END_SESSION: SessionArgs,
    WorkerOp.EVICT: NoArgs,
    WorkerOp.SHUTDOWN_SAVE: NoArgs,
    WorkerOp.APPLY_CHAT_TEMPLATE: ChatTemplateArgs,
    WorkerOp.EMBED: EmbedArgs,
    WorkerOp.LOAD_ADAPTER: AdapterPathArgs,
    WorkerOp.UNLOAD_ADAPTER: AdapterArgs,
    WorkerOp.SET_ADAPTER_SCALE: AdapterScaleArgs,
    WorkerOp.LIST_ADAPTERS: NoArgs,
}
