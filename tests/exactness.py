"""Warm output equals cold output, on every way a request can reuse KV: the harness the exact-cache
tests run against each memory kind (the default model, tiny random-weight models of every kind, and
Gemma 3 270M).

Prompts are random words (seeded, never chosen for their logit margins). For each one the harness
sends the requests below through a real broker, worker and cache store, and compares every request's
greedy tokens with an independent cold reference run of the same prompt (``tests/reference.py``):
with flash attention off they must be identical, token for token.

- ``cold``: a prompt seen for the first time;
- ``regenerate``: the same prompt again after a long reply (the finish row is prompt + reply);
- ``exact``: the prompt primed with ``prefill_only``, then sent (a row that is the whole prompt);
- ``extend``: the first request's context plus new words (a multi-turn continuation);
- ``parent``: the same with the first request's ``finish_key`` as ``parent_key``;
- ``partial``: two thirds of the prompt plus other words (rows longer than the common prefix exist);
- ``sticky``: a session's first turn, a second turn diverging inside its tokens, a third extending it;
- ``shared``: two requests sent together that share an unseen prefix of 80+ words.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from erllama import Client
from tests.conftest import wait_for
from tests.reference import ReferenceModel, assert_identical, top_two_gap

WORDS = [
    "able",
    "acid",
    "aged",
    "also",
    "area",
    "army",
    "away",
    "baby",
    "back",
    "ball",
    "band",
    "bank",
    "base",
    "bath",
    "bear",
    "beat",
    "been",
    "beer",
    "bell",
    "belt",
    "best",
    "bill",
    "bird",
    "blow",
    "blue",
    "boat",
    "body",
    "bomb",
    "bond",
    "bone",
    "book",
    "boom",
    "born",
    "boss",
    "both",
    "bowl",
    "bulk",
    "burn",
    "bush",
    "busy",
    "call",
    "calm",
    "came",
    "camp",
    "card",
    "care",
    "case",
    "cash",
    "cast",
    "cell",
    "chat",
    "chip",
    "city",
    "club",
    "coal",
    "coat",
    "code",
    "cold",
    "come",
    "cook",
    "cool",
    "cope",
    "copy",
    "core",
    "cost",
    "crew",
    "crop",
    "dark",
    "data",
    "date",
    "dawn",
    "days",
    "dead",
    "deal",
    "dean",
    "dear",
    "debt",
    "deep",
    "deny",
    "desk",
    "dial",
    "diet",
    "disc",
    "disk",
    "does",
    "done",
    "door",
    "dose",
    "down",
    "draw",
    "drew",
    "drop",
    "drug",
    "dual",
    "duke",
    "dust",
    "duty",
    "each",
    "earn",
    "ease",
    "east",
    "easy",
    "edge",
    "else",
    "even",
    "ever",
    "evil",
    "exit",
    "face",
    "fact",
    "fail",
    "fair",
    "fall",
    "farm",
    "fast",
    "fate",
    "fear",
    "feed",
    "feel",
    "feet",
    "fell",
    "felt",
    "file",
    "fill",
    "film",
    "find",
    "fine",
    "fire",
    "firm",
    "fish",
    "five",
    "flat",
    "flow",
    "food",
    "foot",
    "ford",
    "form",
    "fort",
    "four",
    "free",
    "from",
    "fuel",
    "full",
    "fund",
    "gain",
    "game",
    "gate",
    "gave",
    "gear",
    "gene",
    "gift",
    "girl",
    "give",
    "glad",
    "goal",
    "goes",
    "gold",
    "golf",
    "gone",
    "good",
    "gray",
    "grew",
    "grey",
    "grow",
    "gulf",
    "hair",
    "half",
    "hall",
    "hand",
    "hang",
    "hard",
    "harm",
    "hate",
    "have",
    "head",
    "hear",
    "heat",
    "held",
    "hell",
    "help",
    "here",
    "hero",
    "high",
    "hill",
    "hire",
    "hold",
    "hole",
    "holy",
    "home",
    "hope",
    "host",
    "hour",
    "huge",
    "hung",
    "hunt",
    "hurt",
    "idea",
    "inch",
    "into",
    "iron",
    "item",
    "jack",
    "jane",
    "jean",
    "john",
    "join",
    "jump",
    "jury",
    "just",
    "keen",
    "keep",
    "kent",
    "kept",
    "kick",
    "kill",
    "kind",
    "king",
    "knee",
    "knew",
    "know",
    "lack",
    "lady",
    "laid",
    "lake",
    "land",
    "lane",
    "last",
    "late",
    "lead",
    "left",
    "less",
    "life",
    "lift",
    "like",
    "line",
    "link",
    "list",
    "live",
    "load",
    "loan",
    "lock",
    "logo",
    "long",
    "look",
    "lord",
    "lose",
    "loss",
    "lost",
    "love",
    "luck",
    "made",
    "mail",
]


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@dataclass
class Exactness:
    """Runs the reuse paths for one model served as ``model`` and counts what each request did."""

    client: Client
    model: str
    reference: ReferenceModel
    n_gen: int = 8
    long_reply: int = 48
    seed: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # (path, cache_hit_kind) -> requests
    compared: int = 0

    def check(self, path: str, prompt: list[int], result: Any) -> None:
        """``result`` (a greedy completion of ``prompt``) generated what the reference generates cold:
        the same tokens, and an end-of-generation token exactly where it stopped."""
        n = len(result.generated)
        ref, logits = self.reference.greedy(prompt, n + 1)
        if result.finish_reason == "length":
            ref = ref[:n]
        at = next((i for i, (a, b) in enumerate(zip(result.generated, ref)) if a != b), None)
        gap = f", reference top-2 gap there {top_two_gap(logits[at]):.4g}" if at is not None else ""
        assert_identical(
            result.generated,
            ref,
            f"{self.model} {path} ({result.cache_hit_kind}, {len(prompt)} tokens{gap}; prompt {prompt})",
        )
        self.kinds[f"{path}:{result.cache_hit_kind}"] += 1
        self.compared += 1

    def run(self, n_prompts: int, words: tuple[int, int] = (30, 120)) -> None:
        rng = random.Random(self.seed)
        for i in range(n_prompts):
            self.one_prompt(rng, i, words)

    def complete(self, prompt: list[int], **params: Any) -> Any:
        params.setdefault("max_tokens", self.n_gen)
        return self.client.complete(self.model, prompt, **params)

    def saved(self, tokens: list[int]) -> None:
        """Wait until the cache holds ``tokens`` (saves land asynchronously)."""
        wait_for(
            lambda: self.client.cached_prefix_len(self.model, tokens) >= len(tokens), 60, "a save to land"
        )

    def tok(self, text: str, bos: bool = True) -> list[int]:
        return self.client.tokenize(self.model, text, add_special=bos)

    def one_prompt(self, rng: random.Random, i: int, words: tuple[int, int]) -> None:
        prompt = self.tok(random_text(rng, rng.randint(*words)))
        more: Callable[[int], list[int]] = lambda n: self.tok(" " + random_text(rng, n), bos=False)

        first = self.complete(prompt, max_tokens=self.long_reply)
        self.check("cold", prompt, first)
        self.saved(first.context_tokens)
        self.check("regenerate", prompt, self.complete(prompt))

        extended = first.context_tokens + more(rng.randint(5, 30))
        self.check("extend", extended, self.complete(extended))
        resumed = first.context_tokens + more(rng.randint(5, 30))
        self.check("parent", resumed, self.complete(resumed, parent_key=first.finish_key))

        cut = max(1, len(prompt) * 2 // 3)
        diverged = prompt[:cut] + more(rng.randint(5, 30))
        self.check("partial", diverged, self.complete(diverged))

        primed = self.tok(random_text(rng, rng.randint(*words)))
        self.client.prefill_only(self.model, primed)
        self.saved(primed)
        self.check("exact", primed, self.complete(primed))

        session = f"s{self.seed}-{i}"
        turn1 = self.complete(prompt + more(8), session_id=session)
        turn2 = prompt[:cut] + more(rng.randint(5, 30))
        self.check("sticky-diverged", turn2, self.complete(turn2, session_id=session))
        ctx2 = self.complete(turn2, session_id=session, max_tokens=self.n_gen).context_tokens
        turn3 = ctx2 + more(rng.randint(5, 20))
        self.check("sticky-extend", turn3, self.complete(turn3, session_id=session))
        self.client.end_session(self.model, session)
        assert turn1.generated is not None

        shared = self.tok(random_text(rng, rng.randint(80, 120)))
        a, b = shared + more(rng.randint(3, 10)), shared + more(rng.randint(3, 10))
        streams = [self.client.infer(self.model, p, max_tokens=self.n_gen) for p in (a, b)]
        for p, s in zip((a, b), streams, strict=True):
            self.check("shared", p, s.collect())
