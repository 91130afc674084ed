"""What every endpoint shares: the one ``AsyncClient`` to the broker, the facts each endpoint needs
about a model (its context size, its thinking and tool-call markers), and the metrics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Final

from erllama.client import AsyncClient
from erllama.gateway.config import SIGNING_KEY_ENV, GatewayConfig
from erllama.gateway.metrics import GatewayMetrics
from erllama.gateway.replay import open_replay

BROKER_CALL_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True, slots=True)
class ModelFacts:
    n_ctx: int  # tokens per sequence: prompt + reply must fit
    thinking_markers: dict[str, str] | None
    tool_call_markers: dict[str, str] | None


class Backend:
    """Created by the app's lifespan; handlers reach it as ``request.app.state.backend``."""

    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        # long enough for a call that waits for a model still loading
        self.client = AsyncClient(cfg.broker, timeout_s=BROKER_CALL_TIMEOUT_S)
        self.metrics = GatewayMetrics(cfg)
        self.replay = open_replay(
            cfg.replay_dir, cfg.signing_key or os.environ.get(SIGNING_KEY_ENV, "").encode()
        )
        self._facts: dict[tuple[str, float], ModelFacts] = {}

    async def close(self) -> None:
        await self.client.close()
        self.metrics.close()

    async def facts(self, model: str) -> ModelFacts:
        """The model's facts from ``model_info`` (raises ``model_not_found``). Cached per model load
        (``loaded_at``): a model unloaded and loaded again with other options is asked again."""
        info: dict[str, Any] = await self.client.model_info(model)
        key = (model, float(info.get("loaded_at") or 0.0))
        facts = self._facts.get(key)
        if facts is None:
            options = info.get("options") or {}
            facts = ModelFacts(
                n_ctx=int(info.get("n_ctx") or options.get("n_ctx") or 0),
                thinking_markers=options.get("thinking_markers"),
                tool_call_markers=options.get("tool_call_markers"),
            )
            if info.get("n_ctx"):  # a model still loading does not know yet
                self._facts[key] = facts
        return facts
