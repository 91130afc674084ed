#!/usr/bin/env python3
"""What llama.cpp does with each memory kind's KV state, measured through the worker's own backend.

    python scripts/memory_facts.py [--kinds llama swa recurrent hybrid encdec] [--gemma3] [--prefill N]

For the tiny models of ``scripts/make_test_models.py`` (and Gemma 3 270M with ``--gemma3``), in the
worker's context (``LlamaBackend``: split KV, ``n_seq_max`` 4, flash attention off), it prints:

- the memory kind llama.cpp reports (``llama_model_is_recurrent``/``is_hybrid``/``n_swa``/``has_encoder``);
- whether a sequence's state restored into another sequence gives bit-identical next-token logits;
- what a partial ``llama_memory_seq_rm(mem, seq, k, -1)`` returns, the ``seq_pos_min``/``pos_max`` it
  leaves, and whether truncate-to-k + prefilling the rest gives the cold run's logits, both on a
  restored state and on the sequence that was prefilled cold;
- for the encoder-decoder model: what happens without ``llama_encode`` and with split KV (each in a
  child process, since llama.cpp aborts), and whether the encoder output is per sequence;
- whether the backend's logits (4 sequences decoded together) equal llama-cpp-python's high-level
  ``Llama`` (flash attention off) on prompts of random words.

The prompts are random words of the tokenizer (``make_test_models.random_text``), not chosen for
anything. Each table says "bit" where two logit rows are equal in every bit.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import llama_cpp as L
import llama_cpp.llama_cpp as llama_lowlevel
import numpy as np

from erllama.options import parse_load_options
from erllama.worker.backend import BatchRow
from erllama.worker.llama_backend import GGML_TYPES, LlamaBackend

SCRIPTS_DIR: Final = Path(__file__).resolve().parent
N_SEQ_MAX: Final = 4
REFERENCE_PROMPTS: Final = 4
REFERENCE_PROMPT_WORDS: Final = 40
GREEDY_STEPS: Final = 8
CHILD_TIMEOUT_S: Final = 120


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


make_test_models = _load_script("make_test_models")


def open_backend(
    path: Path, n_ctx: int, n_seq_max: int = N_SEQ_MAX, kv_unified: bool = False, exact: bool = True
) -> LlamaBackend:
    """``exact=False`` for T5: llama_encode takes the whole input in one micro-batch (exact mode: 32)."""
    opts = {"n_ctx": n_ctx, "n_seq_max": n_seq_max, "kv_unified": kv_unified, "exact": exact}
    return LlamaBackend(path, parse_load_options(opts), refuse_unsupported=False)


def logits_at(be: LlamaBackend, index: int) -> np.ndarray:
    return np.array(
        np.ctypeslib.as_array(L.llama_get_logits_ith(be.ctx, index), shape=(be.n_vocab,)), copy=True
    )


def prefill(be: LlamaBackend, seq: int, tokens: Sequence[int], pos: int = 0) -> np.ndarray:
    """Decode ``tokens`` into ``seq`` from ``pos`` in n_batch chunks; the last token's logits."""
    index = -1
    for start in range(0, len(tokens), be.n_batch):
        chunk = tokens[start : start + be.n_batch]
        index = be.decode([BatchRow(seq, chunk, pos + start, 1)])[0]
    return logits_at(be, index)


def memory_kind(be: LlamaBackend) -> dict[str, Any]:
    m = be.model
    return {
        "is_recurrent": bool(L.llama_model_is_recurrent(m)),
        "is_hybrid": bool(L.llama_model_is_hybrid(m)),
        "n_swa": int(L.llama_model_n_swa(m)),
        "has_encoder": bool(L.llama_model_has_encoder(m)),
    }


def seq_rm(be: LlamaBackend, seq: int, keep: int) -> bool:
    return bool(L.llama_memory_seq_rm(be.mem, seq, keep, -1))


def positions(be: LlamaBackend, seq: int) -> str:
    return f"{L.llama_memory_seq_pos_min(be.mem, seq)}..{L.llama_memory_seq_pos_max(be.mem, seq)}"


def compare(a: np.ndarray, b: np.ndarray) -> str:
    if np.array_equal(a, b):
        return "bit"
    return f"max|d| {float(np.max(np.abs(a - b))):.3g}, argmax {'same' if a.argmax() == b.argmax() else 'differs'}"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n{title}\n| {' | '.join(header)} |\n|{'|'.join(' --- ' for _ in header)}|")
    for row in rows:
        print(f"| {' | '.join(str(c) for c in row)} |")


# --- decoder-only kinds ------------------------------------------------------------------------------------


def state_facts(name: str, path: Path, n_prefill: int, n_swa_hint: int) -> tuple[list[Any], list[list[Any]]]:
    """Round trip and truncation of an ``n_prefill``-token state. Sequences: 0 cold, 1 restored and
    continued, 2 restored and truncated, 3 cold and truncated."""
    be = open_backend(path, n_ctx=n_prefill + 64)
    try:
        kind = memory_kind(be)
        tokens = be.tokenize(make_test_models.random_text(n_prefill, seed=1))[:n_prefill]
        n = len(tokens)
        cold = prefill(be, 0, tokens)
        cold_positions = positions(be, 0)
        state = be.seq_state(0)
        be.seq_restore(1, state)
        restored_positions = positions(be, 1)
        nxt = int(cold.argmax())
        continued = logits_at(be, be.decode([BatchRow(0, [nxt], n, 1)])[0])
        from_restore = logits_at(be, be.decode([BatchRow(1, [nxt], n, 1)])[0])
        summary = [
            name,
            *kind.values(),
            n,
            len(state),
            cold_positions,
            restored_positions,
            compare(continued, from_restore),
        ]
        window = kind["n_swa"] or n_swa_hint
        keeps = sorted(
            {n, n - 1, n - 2, n - window // 2, n - window, n - window - 8, n // 2, 16} & set(range(1, n + 1)),
            reverse=True,
        )
        rows: list[list[Any]] = []
        for keep in keeps:
            be.seq_clear(2)
            be.seq_restore(2, state)
            ok = seq_rm(be, 2, keep)
            after = positions(be, 2)
            result = compare(prefill(be, 2, tokens[keep:], keep), cold) if ok and keep < n else "-"
            be.seq_clear(3)
            prefill(be, 3, tokens)
            ok_cold = seq_rm(be, 3, keep)
            after_cold = positions(be, 3)
            result_cold = compare(prefill(be, 3, tokens[keep:], keep), cold) if ok_cold and keep < n else "-"
            rows.append([name, n, keep, ok, after, result, ok_cold, after_cold, result_cold])
        return summary, rows
    finally:
        be.close()


# --- the encoder-decoder kind ------------------------------------------------------------------------------


def encode(be: LlamaBackend, seqs: Sequence[int], tokens: Sequence[int]) -> int:
    """``llama_encode`` of ``tokens`` for the sequences ``seqs`` (every token belongs to all of them)."""
    b = L.llama_batch_init(len(tokens), 0, len(seqs))
    try:
        for i, tok in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, len(seqs), 0
            for j, seq in enumerate(seqs):
                b.seq_id[i][j] = seq
        b.n_tokens = len(tokens)
        return int(L.llama_encode(be.ctx, b))
    finally:
        L.llama_batch_free(b)


def decoder_start(be: LlamaBackend) -> int:
    start = int(L.llama_model_decoder_start_token(be.model))
    return start if start >= 0 else int(L.llama_vocab_bos(be.vocab))


def child(probe: str, path: Path) -> str:
    """Run a probe that may abort the process in a child; its exit and llama.cpp's last words."""
    env = os.environ | {"GGML_NO_BACKTRACE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--probe", probe, str(path)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env=env,
        check=False,
    )
    said = [ln for ln in proc.stderr.splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()]
    last = said[-1].split("llama.cpp/")[-1] if said else ""
    status = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return f"{status} {proc.stdout.strip()} {last}".strip()


def run_probe(probe: str, path: Path) -> None:
    if probe == "split_kv":
        be = open_backend(path, n_ctx=256, exact=False)
        print("context created")
    elif probe == "decode_without_encode":
        be = open_backend(path, n_ctx=256, n_seq_max=1, exact=False)
        be.decode([BatchRow(0, [decoder_start(be)], 0, 1)])
        print("decoded")
    be.close()


def encdec_facts(path: Path) -> list[list[Any]]:
    rows: list[list[Any]] = [
        ["context with split KV, n_seq_max 4", child("split_kv", path)],
        ["llama_decode before any llama_encode (n_seq_max 1)", child("decode_without_encode", path)],
    ]
    single = open_backend(path, n_ctx=256, n_seq_max=1, exact=False)
    try:
        a = single.tokenize(make_test_models.random_text(30, seed=2))
        b = single.tokenize(make_test_models.random_text(30, seed=3))
        start = decoder_start(single)
        rc = encode(single, [0], a)
        first = prefill(single, 0, [start])
        second_tok = int(first.argmax())
        second = prefill(single, 0, [second_tok], 1)
        rows.append(
            [
                "llama_encode + llama_decode, n_seq_max 1",
                f"encode {rc}, decode ok, greedy {start}->{second_tok}",
            ]
        )
    finally:
        single.close()
    be = open_backend(path, n_ctx=256, n_seq_max=2, kv_unified=True, exact=False)
    try:
        encode(be, [0], a)
        prefill(be, 0, [start])
        encode(be, [1], b)
        prefill(be, 1, [start])
        after_other = prefill(be, 0, [second_tok], 1)
        nan = "NaN logits" if np.isnan(after_other).any() else compare(after_other, second)
        rows.append(["unified KV, 2 sequences: seq 0's next logits after seq 1 encoded another prompt", nan])
        for seq in (0, 1):
            be.seq_clear(seq)
        encode(be, [0, 1], a)  # the encoder output is the context's: encode A for both sequences
        prefill(be, 0, [start])
        be.seq_restore(1, be.seq_state(0))
        cont = prefill(be, 0, [second_tok], 1)
        restored = prefill(be, 1, [second_tok], 1)
        what = "unified KV, A encoded for seqs 0 and 1: seq 0's state restored into seq 1, next logits vs seq 0 / vs 1 seq"
        rows.append([what, f"{compare(restored, cont)} / {compare(restored, second)}"])
    finally:
        be.close()
    return rows


# --- the worker's backend against llama-cpp-python's Llama -------------------------------------------------


def reference_llama(path: Path, n_ctx: int, kv_type: str) -> Any:
    default = llama_lowlevel.llama_model_default_params

    def without_extra_bufts() -> Any:
        params = default()
        params.use_extra_bufts = False  # the AMX repacked path segfaults here (DESIGN.md)
        return params

    llama_lowlevel.llama_model_default_params = without_extra_bufts
    try:
        return L.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=os.cpu_count(),
            n_threads_batch=os.cpu_count(),
            flash_attn=True,
            type_k=GGML_TYPES[kv_type],  # the backend's (exact mode's type for the model's heads)
            type_v=GGML_TYPES[kv_type],
            logits_all=True,
            verbose=False,
        )
    finally:
        llama_lowlevel.llama_model_default_params = default


# How the backend is driven: all sequences in one llama_decode (the scheduler's way); one sequence per
# decode asking only the last prompt token's logits (the scheduler's prefill row); one sequence per decode
# asking every prompt token's logits (what Llama(logits_all=True) computes).
REFERENCE_MODES: Final = ("4 sequences per decode", "1 per decode, last logits", "1 per decode, all logits")


def backend_greedy(
    be: LlamaBackend, prompts: list[list[int]], mode: str
) -> tuple[list[list[np.ndarray]], list[list[int]]]:
    """GREEDY_STEPS greedy tokens after each prompt (prompt i on sequence i) and the logits of each."""
    logits: list[list[np.ndarray]] = [[] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    for i in range(len(prompts)):
        be.seq_clear(i)
    groups = [list(range(len(prompts)))] if mode == REFERENCE_MODES[0] else [[i] for i in range(len(prompts))]
    all_logits = mode == REFERENCE_MODES[2]
    for group in groups:
        rows = [BatchRow(i, prompts[i], 0, len(prompts[i]) if all_logits else 1) for i in group]
        for step in range(GREEDY_STEPS):
            for i, index in zip(group, be.decode(rows)):
                logits[i].append(logits_at(be, index))
                tokens[i].append(int(logits[i][-1].argmax()))
            rows = [BatchRow(i, [tokens[i][-1]], len(prompts[i]) + step, 1) for i in group]
    return logits, tokens


def reference_facts(name: str, path: Path) -> list[list[Any]]:
    n_ctx = 256
    be = open_backend(path, n_ctx=n_ctx)
    try:
        prompts = [
            be.tokenize(make_test_models.random_text(REFERENCE_PROMPT_WORDS, seed=10 + i))
            for i in range(REFERENCE_PROMPTS)
        ]
        runs = {mode: backend_greedy(be, prompts, mode) for mode in REFERENCE_MODES}
        kv_type = be.kv_types[0]
    finally:
        be.close()
    llm = reference_llama(path, n_ctx, kv_type)
    rows = []
    try:
        for mode, (ours, tokens) in runs.items():
            same_prefill = same_steps = 0
            worst = 0.0
            for i, prompt in enumerate(prompts):
                llm.reset()
                llm.eval(prompt)
                for step in range(GREEDY_STEPS):
                    ref = np.asarray(llm.scores[llm.n_tokens - 1])
                    same = bool(np.array_equal(ref, ours[i][step]))
                    same_prefill += same and step == 0
                    same_steps += same and step > 0
                    worst = max(worst, float(np.max(np.abs(ref - ours[i][step]))))
                    llm.eval([tokens[i][step]])
            n = len(prompts)
            rows.append(
                [name, mode, f"{same_prefill}/{n}", f"{same_steps}/{n * (GREEDY_STEPS - 1)}", f"{worst:.3g}"]
            )
    finally:
        llm.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="*", default=[k.value for k in make_test_models.Kind])
    ap.add_argument("--gemma3", action="store_true", help="also Gemma 3 270M (installed by the test extra)")
    ap.add_argument("--prefill", type=int, default=200, help="prompt tokens of the tiny models' states")
    ap.add_argument("--gemma3-prefill", type=int, default=1200)
    ap.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        run_probe(args.probe[0], Path(args.probe[1]))
        return 0
    sys.path.insert(0, str(SCRIPTS_DIR.parent))  # the repository root, for tests.memory_models
    from tests.memory_models import gemma3_270m_path, memory_model_path

    models = [(k, memory_model_path(k), args.prefill) for k in args.kinds]
    if args.gemma3:
        models.append(("gemma3-270m", gemma3_270m_path(), args.gemma3_prefill))
    summaries, truncations, references = [], [], []
    for name, path, n_prefill in models:
        if name == "encdec":
            continue
        summary, rows = state_facts(name, path, n_prefill, make_test_models.SWA_WINDOW_TOKENS)
        summaries.append(summary)
        truncations += rows
        references += reference_facts(name, path)
    table(
        "Memory kind and state round trip (restore into another sequence, decode the next token)",
        [
            "model",
            "is_recurrent",
            "is_hybrid",
            "n_swa",
            "has_encoder",
            "N",
            "state bytes",
            "pos after cold prefill",
            "pos after restore",
            "restored vs continued",
        ],
        summaries,
    )
    table(
        "Truncation: llama_memory_seq_rm(seq, k, -1), then prefill tokens k..N-1 and compare with the cold run",
        [
            "model",
            "N",
            "k",
            "restored: rm",
            "pos after",
            "logits vs cold",
            "cold seq: rm",
            "pos after",
            "logits vs cold",
        ],
        truncations,
    )
    table(
        f"Worker backend (split KV, 4 sequences) vs llama_cpp.Llama (logits_all), flash attention off: "
        f"{REFERENCE_PROMPTS} prompts of {REFERENCE_PROMPT_WORDS} random words, {GREEDY_STEPS} greedy tokens each",
        [
            "model",
            "how the backend decodes",
            "bit-identical prompt logits",
            "bit-identical decode steps",
            "max |d|",
        ],
        references,
    )
    if "encdec" in args.kinds:
        table("Encoder-decoder (t5)", ["what", "result"], encdec_facts(memory_model_path("encdec")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
