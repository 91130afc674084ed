"""Operations a client asks of a model's worker outside generation: tokens, chat templates,
embeddings, LoRA adapters, sessions and cache admin. Each runs on the worker's thread between
two ticks, so it never races a decode.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from erllama.options import validate_prompt
from erllama.protocol import ErllamaError, ErrorCode, SaveReason, WorkerOp
from erllama.protocol.ops import (
    OP_ARGS,
    AdapterArgs,
    AdapterPathArgs,
    AdapterScaleArgs,
    ChatTemplateArgs,
    DetokenizeArgs,
    EmbedArgs,
    TokenizeArgs,
)
from erllama.worker.backend import Backend, BackendError
from erllama.worker.chat_template import ChatTemplate
from erllama.worker.kvcache import KVCache
from erllama.worker.scheduler import Scheduler

log = logging.getLogger(__name__)

MAX_SCALE = 100.0


@dataclass(slots=True)
class Adapter:
    handle: int
    path: str
    sha256: str
    scale: float
    native: Any


class WorkerOps:
    def __init__(
        self,
        backend: Backend[Any],
        scheduler: Scheduler,
        cache: KVCache | None,
        refingerprint: Callable[[list[tuple[str, float]]], bytes],
    ):
        self.backend = backend
        self.scheduler = scheduler
        self.cache = cache
        self._refingerprint = refingerprint  # the model fingerprint for an adapter set
        self._template: ChatTemplate | None = None
        self.adapters: list[Adapter] = []
        self._handles = itertools.count(1)
        self._table: dict[WorkerOp, Callable[[Any], Any]] = {  # each takes its op's OpArgs
            WorkerOp.TOKENIZE: self.tokenize,
            WorkerOp.DETOKENIZE: self.detokenize,
            WorkerOp.APPLY_CHAT_TEMPLATE: self.apply_chat_template,
            WorkerOp.EMBED: self.embed,
            WorkerOp.END_SESSION: lambda a: self.scheduler.end_session(a.session_id),
            WorkerOp.EVICT: lambda a: self.scheduler.save_all(SaveReason.EVICT),
            WorkerOp.SHUTDOWN_SAVE: lambda a: self.scheduler.save_all(SaveReason.SHUTDOWN),
            WorkerOp.LOAD_ADAPTER: self.load_adapter,
            WorkerOp.UNLOAD_ADAPTER: self.unload_adapter,
            WorkerOp.SET_ADAPTER_SCALE: self.set_adapter_scale,
            WorkerOp.LIST_ADAPTERS: lambda a: self.list_adapters(),
        }

    def dispatch(self, op: WorkerOp, args: dict[str, Any]) -> Any:
        """Run ``op`` with ``args`` turned into its typed arguments (``invalid_params`` naming the field)."""
        try:
            typed = msgspec.convert(args, OP_ARGS[op])
        except msgspec.ValidationError as exc:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, f"{op.value}: {exc}") from None
        return self._table[op](typed)

    # --- text ----------------------------------------------------------------------------------------------

    def tokenize(self, args: TokenizeArgs) -> list[int]:
        return self.backend.tokenize(args.text, args.add_special, args.parse_special)

    def detokenize(self, args: DetokenizeArgs) -> str:
        tokens = validate_prompt(args.tokens, self.backend.n_vocab)
        assert isinstance(tokens, list)  # a list in, a list out
        return self.backend.detokenize(tokens)

    def apply_chat_template(self, args: ChatTemplateArgs) -> list[int]:
        """Render messages with the model's own template and tokenize (special tokens parsed)."""
        if self._template is None:
            info = self.backend.info()
            eos = (
                self.backend.token_bytes(info["eos_token_id"]).decode(errors="replace")
                if "eos_token_id" in info
                else ""
            )
            bos = (
                self.backend.token_bytes(info["bos_token_id"]).decode(errors="replace")
                if "bos_token_id" in info
                else ""
            )
            self._template = ChatTemplate(info.get("chat_template"), bos_token=bos, eos_token=eos)
        text = self._template.render(
            args.messages,
            system=args.system,
            tools=args.tools,
            add_generation_prompt=args.add_generation_prompt,
        )
        # A template that writes the BOS itself must not get a second one from the tokenizer.
        add_special = not (self._template.bos_token and text.startswith(self._template.bos_token))
        return self.backend.tokenize(text, add_special=add_special, parse_special=True)

    def embed(self, args: EmbedArgs) -> list[float]:
        tokens = validate_prompt(args.input, self.backend.n_vocab)
        if isinstance(tokens, str):
            tokens = self.backend.tokenize(tokens)
        if len(tokens) > self.backend.n_ctx_seq:
            raise ErllamaError(
                ErrorCode.CONTEXT_OVERFLOW,
                f"{len(tokens)} tokens exceed the context of {self.backend.n_ctx_seq}",
            )
        try:
            return self.backend.embed(tokens)
        except BackendError as exc:
            raise ErllamaError(ErrorCode.INTERNAL, exc.message) from None

    # --- adapters ------------------------------------------------------------------------------------------

    def load_adapter(self, args: AdapterPathArgs) -> dict[str, Any]:
        path = Path(args.path)
        if not path.is_file():
            raise ErllamaError(ErrorCode.LOAD_FAILED, f"adapter file {path} does not exist")
        try:
            native = self.backend.load_adapter(str(path))
        except BackendError as exc:
            code = ErrorCode.NOT_SUPPORTED if exc.code == "not_supported" else ErrorCode.LOAD_FAILED
            raise ErllamaError(code, exc.message) from None
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        adapter = Adapter(next(self._handles), str(path.resolve()), digest, 1.0, native)
        self.adapters.append(adapter)
        self._apply()
        return self._describe(adapter)

    def unload_adapter(self, args: AdapterArgs) -> bool:
        adapter = next((a for a in self.adapters if a.handle == args.handle), None)
        if adapter is None:
            return False
        self.adapters.remove(adapter)
        self._apply()
        self.backend.free_adapter(adapter.native)
        return True

    def set_adapter_scale(self, args: AdapterScaleArgs) -> dict[str, Any]:
        if not -MAX_SCALE <= args.scale <= MAX_SCALE:  # NaN fails this too
            raise ErllamaError(ErrorCode.INVALID_PARAMS, f"scale must be within [-{MAX_SCALE}, {MAX_SCALE}]")
        adapter = next((a for a in self.adapters if a.handle == args.handle), None)
        if adapter is None:
            raise ErllamaError(ErrorCode.NOT_FOUND, f"no adapter with handle {args.handle}")
        adapter.scale = args.scale
        self._apply()
        return self._describe(adapter)

    def list_adapters(self) -> list[dict[str, Any]]:
        return [self._describe(a) for a in self.adapters]

    def _apply(self) -> None:
        """Put the adapter set on the context and re-key the cache: rows made under one set are never
        served under another."""
        self.backend.set_adapters([(a.native, a.scale) for a in self.adapters])
        self.scheduler.adapters_changed()
        if self.cache is not None:
            self.cache.fingerprint = self._refingerprint([(a.sha256, a.scale) for a in self.adapters])

    @staticmethod
    def _describe(a: Adapter) -> dict[str, Any]:
        return {"handle": a.handle, "path": a.path, "scale": a.scale, "sha256": a.sha256}
