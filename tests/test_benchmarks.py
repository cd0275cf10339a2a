"""The decode benchmark's bookkeeping: a mode's stats over several turns (--rounds) and a smoke run on the CPU."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_decode  # noqa: E402


def turn(steps, retrieval_s, idle, bytes_cpu):
    total = dict(decode_steps=steps, retrieval_s=retrieval_s, bytes_cpu=bytes_cpu)
    return dict(total, per_step={k: v / steps for k, v in total.items()}, gpu_idle_ratio=idle, store={"kv_bytes": 1})


def test_merge_stats_adds_totals_and_weights_the_idle_ratio():
    merged = bench_decode.merge_stats([turn(4, 0.4, 0.5, 400), turn(2, 0.1, 0.0, 100)])
    assert merged["decode_steps"] == 6
    assert merged["bytes_cpu"] == 500
    assert merged["per_step"]["retrieval_s"] == pytest.approx(0.5 / 6)
    assert merged["per_step"]["bytes_cpu"] == pytest.approx(500 / 6)
    assert merged["gpu_idle_ratio"] == pytest.approx((0.4 * 0.5 + 0.1 * 0.0) / 0.5)
    one = turn(3, 0.3, 0.2, 30)
    assert bench_decode.merge_stats([one]) is one


def test_rounds_time_every_mode_in_turns(tmp_path):
    out = tmp_path / "decode.json"
    assert bench_decode.main(["--tiny", "--device", "cpu", "--modes", "fixed16-0.05", "full", "--rounds", "2",
                              "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["mode"], r["batch"]) for r in rows) == [("fixed16-0.05", 1), ("fixed16-0.05", 2), ("full", 1),
                                                            ("full", 2)]
    for r in rows:
        assert r["stats"]["decode_steps"] == 2 * 4  # two turns of the tiny run's 4 timed steps
        assert r["stats"]["per_step"]["bytes_cpu"] > 0
        assert r["attention_ms"] > 0
        per = r["stats"]["per_step"]
        assert r["cpu_side_gbps"] == pytest.approx(per["bytes_cpu"] / per["cpu_busy_s"] / 1e9)
        assert r["gpu_side_gbps"] == 0.0  # no GPU side on the CPU
    with pytest.raises(SystemExit):
        bench_decode.main(["--tiny", "--device", "cpu", "--rounds", "0"])
