"""bench.hot_path's ratios, goals, round order and table from made-up loads (no servers)."""

from __future__ import annotations

import pytest

from bench import hot_path as hp
from bench.load import LoadResult, RequestTiming


def load(wall_s: float, gap_s: float, requests: int = 4) -> LoadResult:
    return LoadResult("documents", 16, wall_s, (RequestTiming(100, 32, 0.1, (gap_s,) * 31),) * requests)


def test_ratios_pool_rounds_and_spread_compares_each_round_with_vllm_in_the_same_round():
    rows = hp.figures({"vllm": [load(1.0, 0.010), load(2.0, 0.010)], "kvbm-g2": [load(1.0, 0.010), load(4.0, 0.012)]})
    kvbm = rows["kvbm-g2"]
    assert kvbm["tok_s_ratio"] == pytest.approx(3.0 / 5.0)  # 256 tokens / 5 s against / 3 s
    assert kvbm["tok_s_ratio_spread"] == pytest.approx([0.5, 1.0])
    assert kvbm["tok_s_ratio_median"] == pytest.approx(0.75)
    assert kvbm["itl_p50_ratio"] == pytest.approx(1.1) and kvbm["itl_p99_ratio"] == pytest.approx(1.2)
    assert rows["vllm"]["tok_s_ratio"] == 1.0


def test_goals_per_workload_and_setup():
    fine = {"tok_s_ratio": 0.98, "itl_p50_ratio": 1.02}
    assert hp.goals("cold", "kvbm-g2", fine) == [("tok/s >=0.97x", True), ("ITL p50 <=1.05x", True)]
    assert [met for _, met in hp.goals("cold", "kvbm-g2", {"tok_s_ratio": 0.9, "itl_p50_ratio": 1.1})] == [False, False]
    assert hp.goals("cold", "router", {"tok_s_ratio": 0.96, "itl_p50_ratio": 2.0}) == [("tok/s >=0.95x", True)]
    assert hp.goals("hit", "kvbm-g2", {"tok_s_ratio": 1.0, "itl_p50_ratio": 1.0}) == [("tok/s >1x", False)]
    assert hp.goals("cold", "vllm", fine) == [] and hp.goals("hit", "router", fine) == []
    # One stalled round (pooled 0.9x) does not decide: the median of the rounds does.
    stalled = {"tok_s_ratio": 0.9, "tok_s_ratio_median": 0.99, "itl_p50_ratio": 1.0}
    assert [met for _, met in hp.goals("cold", "kvbm-g2", stalled)] == [True, True]
    assert hp.goals("hit", "kvbm-g2", {**stalled, "tok_s_ratio_median": 0.98}) == [("tok/s >1x", False)]


def test_setups_subset_keeps_vllm_alone_and_the_routers_server():
    args = hp.parse_args(["--setups", "router", "--loads", "cold"])
    assert [row.key for row in args.setups] == ["vllm", "kvbm-g2", "router"] and args.loads == ["cold"]
    assert [row.key for row in hp.parse_args([]).setups] == [row.key for row in hp.SETUPS]
    with pytest.raises(SystemExit):
        hp.parse_args(["--setups", "kvbm-g9"])


def test_rounds_rotate_the_order_and_each_round_has_its_own_documents():
    keys = [[row.key for row in hp.rotated(hp.SETUPS, n)] for n in range(len(hp.SETUPS))]
    assert all(sorted(k) == sorted(keys[0]) for k in keys)
    assert [k[0] for k in keys] == [row.key for row in hp.SETUPS]  # every setup goes first once
    first, second = (hp.workload("hit", 1000, 8, n) for n in (0, 1))
    assert {r.prompt[:16] for r in first.requests}.isdisjoint({r.prompt[:16] for r in second.requests})
    cold = hp.workload("cold", 1000, 8, 0)
    assert len({r.prompt[: hp.COLD_DOC_TOKENS] for r in cold.requests}) == 8  # no shared prefix


def test_table_and_arguments():
    group = {
        "model": "tiny",
        "streams": 16,
        "workload": "cold",
        "requests": 64,
        "setups": hp.figures({"vllm": [load(1.0, 0.01)], "kvbm-g2": [load(1.1, 0.01)]}),
    }
    text = hp.table({"groups": [group]})
    assert "vLLM + kvbm G2" in text and "✗ tok/s >=0.97x" in text and "✓ ITL p50 <=1.05x" in text
    assert hp.parse_args(["--quick"]).rounds == 1 and hp.parse_args([]).streams == [1, 16, 64]
    with pytest.raises(SystemExit):
        hp.parse_args(["--rounds", "0"])
