"""``scripts/llama_batched_bench.py`` reads llama.cpp's table: the decode speed per number of sequences."""

from __future__ import annotations

from tests.conftest import load_script

# Printed by llama-batched-bench (llama-cpp-python 0.3.36's llama.cpp) on the project machine.
TABLE = """\
main: n_kv_max = 8192, n_batch = 512, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_gpu_layers = -1

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |    1 |    256 |    0.689 |   185.89 |    1.669 |    76.70 |    2.357 |   108.59 |
|   128 |    128 |    8 |   2048 |    5.067 |   202.07 |    7.491 |   136.69 |   12.559 |   163.08 |

llama_perf_context_print:        load time =     123.45 ms
"""


def test_the_decode_speed_column_is_read_per_number_of_sequences():
    bench = load_script("llama_batched_bench")
    assert bench.parse_decode_speeds(TABLE) == {1: 76.70, 8: 136.69}


def test_a_table_without_rows_reads_as_no_speeds():
    bench = load_script("llama_batched_bench")
    assert bench.parse_decode_speeds("error: failed to load model\n") == {}
