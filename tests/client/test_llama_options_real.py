"""llama.cpp options reach the context: a quantized KV cache with flash attention still generates."""

from erllama import Client
from tests.conftest import BrokerProcess


def test_quantized_kv_cache_and_the_fast_kernels_load_and_generate(real_broker: BrokerProcess):
    c: Client = real_broker.client(timeout_s=60)
    info = c.load_model(
        "q8kv",
        None,
        n_ctx=512,
        n_seq_max=1,
        type_k="q8_0",
        type_v="q8_0",
        flash_attn="on",
        exact=False,
        n_batch=256,
        n_ubatch=128,
        n_threads=1,
        use_mmap=False,
    )
    try:
        assert (
            info["options"]["type_k"] == "q8_0"
            and info["options"]["n_ubatch"] == 128
            and info["n_ctx"] == 512
        )
        assert info["exact"] is False
        r = c.complete("q8kv", "The capital of France is", max_tokens=8)
        assert r.finish_reason == "length" and "Paris" in r.reply
    finally:
        c.unload_model("q8kv")
