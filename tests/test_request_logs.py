"""One grep follows a request through the logs of the broker, its worker and the cache store."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import remove_runtime, short_tmpdir, start_broker

PROMPT_TOKENS = list(range(1, 120))  # long enough for a cold save and a finish save (cache_min_tokens 64)


def test_every_process_logs_a_requests_admission_restore_saves_and_finish_under_its_rid(
    tmp_path: Path,
) -> None:
    rdir = short_tmpdir("erl-g-")
    log_path = tmp_path / "broker.log"
    try:
        with open(log_path, "wb") as log:
            bp = start_broker(rdir, "--no-default-model", "--log-level", "DEBUG", stderr=log)
            try:
                with bp.client(timeout_s=60.0) as c:
                    c.load_model("g", backend="stub", n_ctx=512, n_seq_max=1)
                    first = c.infer("g", PROMPT_TOKENS, max_tokens=4)
                    first.collect()
                    second = c.infer("g", PROMPT_TOKENS, max_tokens=4)  # restores what the first saved
                    assert second.collect().cache_hit_kind in ("exact", "partial")
            finally:
                bp.stop()
        text = log_path.read_text(errors="replace")
    finally:
        remove_runtime(rdir)
    for stream in (first, second):
        admitted = re.search(rf"rid=(\d+) admitted: client request {stream.request_id}", text)
        assert admitted is not None, text[-3000:]
        lines = [line for line in text.splitlines() if re.search(rf"\brid={admitted.group(1)}\b", line)]
        roles = {line.split()[2] for line in lines}  # "<date> <time> <role> <level> ..."
        assert {"broker", "worker[g]", "cachestore"} <= roles, lines
        assert any("finished" in line for line in lines if " broker " in line), lines
        assert any("save of" in line for line in lines if "worker[g]" in line), lines
    restored = re.search(rf"rid=(\d+) admitted: client request {second.request_id}", text)
    assert restored is not None
    assert any("restored" in line and f"rid={restored.group(1)} " in line for line in text.splitlines())
