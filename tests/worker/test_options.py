"""Sampling parameters and load options are validated before anything reaches llama.cpp."""

import math

import pytest

from erllama import ErllamaError
from erllama.options import parse_load_options, parse_sampling, validate_model_id, validate_prompt


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": -1},
        {"temperature": math.nan},
        {"temperature": "hot"},
        {"top_p": 1.5},
        {"top_k": -3},
        {"min_p": math.inf},
        {"max_tokens": -1},
        {"max_tokens": 1.5},
        {"max_tokens": True},
        {"seed": -5},
        {"stop": [1, 2]},
        {"stop": [""]},
        {"stop": ["x"] * 17},
        {"repetition_penalty": math.nan},
        {"temprature": 0.5},
    ],
)
def test_bad_sampling_values_and_types_are_invalid_params(params):
    with pytest.raises(ErllamaError) as exc:
        parse_sampling(params)
    assert exc.value.code == "invalid_params"


def test_sampling_defaults_are_greedy_with_256_tokens():
    p = parse_sampling({})
    assert p.temperature == 0.0 and p.max_tokens == 256 and p.seed is None


def test_a_single_stop_string_is_accepted_as_a_list():
    assert parse_sampling({"stop": "\n"}).stop == ("\n",)


@pytest.mark.parametrize(
    "opts",
    [
        {"n_ctx": 0},
        {"n_ctx": "big"},
        {"n_batch": 64, "n_ubatch": 128},
        {"type_k": "q3"},
        {"flash_attn": True},
        {"split_mode": "diagonal"},
        {"tensor_split": [0.5, "x"]},
        {"n_seq_max": 0},
        {"use_mmap": "yes"},
        {"n_gpu_layers": -2},
        {"no_such_option": 1},
        {"type_v": "q8_0", "flash_attn": "off", "exact": False},
        {"flash_attn": "off"},  # exact mode needs flash attention
        {"type_k": "f16"},  # ... and a K cache whose attention kernel does not depend on the batch shape
        {"type_k": "f32", "type_v": "f32"},
    ],
)
def test_bad_load_options_are_invalid_params(opts):
    with pytest.raises(ErllamaError) as exc:
        parse_load_options(opts)
    assert exc.value.code == "invalid_params"


def test_exact_mode_resolves_to_a_q8_0_kv_cache_bf16_for_odd_heads_and_the_fast_mode_to_f16():
    assert parse_load_options({}).kv_types(64, 64) == ("q8_0", "q8_0")
    assert parse_load_options({}).kv_types(80, 128) == ("bf16", "q8_0")
    assert (
        parse_load_options({}).to_wire()["type_k"] is None
    )  # resolved by the worker, once it knows the heads
    assert parse_load_options({"exact": False}).kv_types(64, 64) == ("f16", "f16")
    assert parse_load_options({"type_k": "bf16", "type_v": "q4_0"}).kv_types(16, 16) == ("bf16", "q4_0")


def test_use_extra_bufts_defaults_off():
    assert parse_load_options({}).use_extra_bufts is False


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "x" * 200, 5, None, ".hidden"])
def test_model_ids_cannot_name_paths(bad):
    with pytest.raises(ErllamaError):
        validate_model_id(bad)


@pytest.mark.parametrize("prompt", ["", [], [1, -1], [1, "a"], [True], {"a": 1}, [1, 10**9]])
def test_bad_prompts_are_invalid_params(prompt):
    with pytest.raises(ErllamaError) as exc:
        validate_prompt(prompt, n_vocab=1000)
    assert exc.value.code == "invalid_params"


def test_the_stub_prefill_cost_is_a_sleep_per_batch_token_on_top_of_the_decode_sleep(monkeypatch):
    from erllama.worker import stub_backend
    from erllama.worker.backend import BatchRow
    from erllama.worker.main import load_backend

    options = parse_load_options(
        {"backend": "stub", "n_ctx": 256, "stub_decode_ms": 2, "stub_prefill_us_per_token": 500}
    )
    backend, _ = load_backend(None, options)
    slept: list[float] = []
    monkeypatch.setattr(stub_backend.time, "sleep", slept.append)
    backend.decode([BatchRow(seq_id=0, tokens=list(range(2, 102)), pos=0, n_logits=1)])
    backend.decode([BatchRow(seq_id=0, tokens=[5], pos=100, n_logits=1)])
    assert slept == pytest.approx([0.002 + 100 * 0.0005, 0.002 + 0.0005])
    with pytest.raises(ErllamaError) as exc:
        parse_load_options({"stub_prefill_us_per_token": -1})
    assert exc.value.code == "invalid_params"
