"""bench.disagg_load's goals, table and plot from made-up rows (no servers)."""

from __future__ import annotations

import pytest

from bench import disagg_load as dl


def row(setup: str, tok_s: float, ttft: tuple[float, float], itl: tuple[float, float], **extra) -> dict:
    return {
        "model": "tiny",
        "streams": 16,
        "setup": setup,
        "name": dl.SETUPS[setup].name,
        "output_tok_s": tok_s,
        "ttft_p50_ms": ttft[0],
        "ttft_p99_ms": ttft[1],
        "itl_p50_ms": itl[0],
        "itl_p99_ms": itl[1],
        "request_errors": 0,
        "notes": "",
        **extra,
    }


def group(kvbm: dict | None = None, nixl: dict | None = None) -> list[dict]:
    rows = [
        row(dl.VLLM, 200, (40, 80), (10, 20)),
        row(dl.KVBM_AGG, 180, (50, 100), (12, 30), recomputed_blocks=0),
        kvbm or row(dl.KVBM_1P1D, 160, (60, 115), (11, 25), failed_pulls=0, recomputed_blocks=0, not_handed_off=0),
        nixl or row(dl.NIXL_1P1D, 120, (90, 200), (15, 40), failed_pulls=0, recomputed_blocks=None),
    ]
    return rows


def goals_of(rows: list[dict], setup: str = dl.KVBM_1P1D) -> dict[str, bool | None]:
    verdicts = dl.judge(dl.groups(rows)[("tiny", 16)])
    return {g.label: g.met for g in verdicts[setup]}


def test_every_goal_met():
    goals = goals_of(group())
    assert list(goals) == ["clean", "tok/s ≥0.8x", "ITL p99 ≤1x", "TTFT p99 ≤1.2x", "beats NIXL"]
    assert all(goals.values())
    assert dl.missed(group()) == []


def test_thresholds_are_against_kvbm_aggregated():
    kvbm = row(dl.KVBM_1P1D, 143, (60, 121), (11, 31), failed_pulls=0, not_handed_off=0)  # 0.79x, 1.21x, 1.03x
    goals = goals_of(group(kvbm=kvbm))
    assert goals == {
        "clean": True,
        "tok/s ≥0.8x": False,
        "ITL p99 ≤1x": False,
        "TTFT p99 ≤1.2x": False,
        "beats NIXL": True,
    }


def test_failed_pulls_unhanded_requests_and_errors_are_not_clean():
    for extra in ({"failed_pulls": 2}, {"not_handed_off": 1}, {"request_errors": 1}):
        kvbm = row(dl.KVBM_1P1D, 160, (60, 115), (11, 25), **{"failed_pulls": 0, "not_handed_off": 0, **extra})
        assert goals_of(group(kvbm=kvbm))["clean"] is False, extra


def test_behind_nixl_on_one_figure_misses_and_names_it():
    nixl = row(dl.NIXL_1P1D, 120, (55, 200), (15, 40), failed_pulls=0)  # NIXL's TTFT p50 is lower
    verdicts = dl.judge(dl.groups(group(nixl=nixl))[("tiny", 16)])
    beats = verdicts[dl.KVBM_1P1D][-1]
    assert beats.met is False and "TTFT p50 ms" in beats.detail


def test_missing_or_failed_baselines_are_not_judged():
    rows = group()
    rows[1] = {
        "model": "tiny",
        "streams": 16,
        "setup": dl.KVBM_AGG,
        "name": "kvbm aggregated x2",
        "error": "ServerStartError: worker w1 did not start\nlog tail",
    }
    del rows[3]
    goals = goals_of(rows)
    assert goals["tok/s ≥0.8x"] is None and goals["beats NIXL"] is None
    assert goals_of(rows, dl.KVBM_AGG) == {"clean": False}


def test_table_shows_figures_with_both_ratios_and_marks():
    lines = dl.table(group()).splitlines()
    assert len(lines) == 2 + 4
    header = cells(lines[0])
    rows = {cells(line)[header.index("setup")]: dict(zip(header, cells(line))) for line in lines[2:]}
    kvbm = rows["kvbm 1P+1D"]
    assert kvbm["tok/s"] == "160 (0.889 / 0.8)"  # x kvbm aggregated / x vLLM alone
    assert kvbm["goals"] == "✓ clean ✓ tok/s ≥0.8x ✓ ITL p99 ≤1x ✓ TTFT p99 ≤1.2x ✓ beats NIXL"
    nixl = rows["NixlConnector 1P+1D"]
    assert (nixl["failed pulls"], nixl["recomputed blocks"]) == ("0", "n/a")  # vLLM counts no recomputed blocks
    alone = rows["vLLM alone"]
    assert (alone["failed pulls"], alone["recomputed blocks"]) == ("-", "-")  # one server: no pulls


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_markdown_and_plot(tmp_path):
    results = {
        "command": "python -m bench.disagg_load --quick",
        "quick": True,
        "started": "t0",
        "finished": "t1",
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "memory_gib": 24,
            "gpus": [],
            "cuda": None,
            "torch": "2",
            "vllm": "0.32",
            "load_average": [1, 1, 1],
        },
        "workloads": {"tiny, 16 streams": "32 queries"},
        "rows": group(),
    }
    text = dl.markdown(results)
    assert "| model |" in text and "tiny, 16 streams: 32 queries" in text
    pytest.importorskip("matplotlib")
    assert dl.plot(results["rows"], tmp_path / "p.png", "subtitle")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_handoff_figures_and_notes_from_counters():
    counters = {
        "prefill": {},
        "router": {"disaggregated": 30},
        "decode": {
            "kvbm.remote.pulls.jobs_failed": 2,
            "kvbm.remote.pulls.blocks_failed": 16,
            "kvbm.remote.load_error_blocks": 16,
            "kvbm.remote.pulls.failures.timeout": 2,
            "kvbm.remote.pulls.failures.not_held": 0,
        },
    }
    spec = dl.SETUPS[dl.KVBM_1P1D]
    figures = dl.handoff_figures(spec, counters, sent=32)
    assert figures == {
        "not_handed_off": 2,
        "failed_pulls": 2,
        "failed_pull_blocks": 16,
        "failure_kinds": {"timeout": 2},
        "recomputed_blocks": 16,
    }
    text = dl.notes(spec, {**figures, "skipped": 3, "load_average": [99.0, 1.0]}, counters, 240, cuda=0)
    assert "busy machine" in text and "3 requests not sent" in text and "timeout 2" in text
    assert dl.handoff_figures(dl.SETUPS[dl.VLLM], {"router": {}}, sent=32) == {}


def test_rounds_pool_their_requests_and_each_round_has_its_own_documents():
    from bench.load import LoadResult, RequestTiming

    fast = LoadResult("documents", 16, 2.0, (RequestTiming(10, 32, 0.1, (0.01,) * 31),) * 2)
    slow = LoadResult("documents", 16, 6.0, (RequestTiming(10, 32, 0.5, (0.05,) * 31),) * 2, skipped=1)
    pooled = dl.pooled([fast, slow]).summary()
    assert pooled["requests"] == 4 and pooled["skipped"] == 1
    assert pooled["output_tok_s"] == pytest.approx(4 * 32 / 8.0)  # tokens over the summed wall time
    first, second = (dl.workload(1000, 8, number) for number in (0, 1))
    assert {r.prompt[:16] for r in first.requests}.isdisjoint({r.prompt[:16] for r in second.requests})
    assert dl.parse_args(["--quick"]).rounds == 1 and dl.parse_args([]).rounds == dl.FULL_ROUNDS
    with pytest.raises(SystemExit):
        dl.parse_args(["--rounds", "0"])
