"""Benchmark smoke test on the tiny LLaMA: rows complete and sane, report files written. Timings are never asserted."""

from __future__ import annotations

import json
import math

import pytest
import torch
from zoo import tiny_llama, token_ids

import loraprune
from loraprune.runtime.bench import bench_pair, stage_allocated_mb, write_report

CELL_FIELDS = {"median_ms", "min_ms", "max_ms", "runs", "samples_ms", "tokens_per_s", "stage_mem_mb"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        dense = tiny_llama()
        compact = loraprune.prune(dense, token_ids(1, 8), loraprune.MagnitudeConfig(ratio=0.5)).model
        return bench_pair(dense, compact, grid=((1, 8),), decode_tokens=4, threads=1, runs=2, warmup=1,
                          workdir=tmp_path_factory.mktemp("bench_onnx"))
    finally:
        torch.set_num_threads(before)


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_rows_cover_every_stage_and_backend(results):
    assert {(r["stage"], r["backend"]) for r in results["rows"]} == {
        (s, b) for s in ("prefill", "decode") for b in ("torch", "ort", "genai")}
    for row in results["rows"]:
        assert (row["batch"], row["seq"]) == (1, 8)
        for name in ("dense", "compact"):
            cell = row[name]
            assert CELL_FIELDS <= cell.keys()
            assert cell["runs"] == len(cell["samples_ms"]) == 2
            assert all(_positive(cell[k]) for k in ("median_ms", "min_ms", "max_ms", "tokens_per_s"))
            assert cell["min_ms"] <= cell["median_ms"] <= cell["max_ms"]
            mem = cell["stage_mem_mb"]
            assert mem is None or (math.isfinite(mem) and mem >= 0)
        assert all(_positive(row[k]) for k in ("speedup", "ideal", "efficiency"))
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["ideal"])
        assert row["ideal"] > 1  # the pruned model does less work and reads fewer bytes
        if row["stage"] == "prefill":
            assert row["ideal_basis"] == "macs"
            assert row["ideal"] == pytest.approx(row["dense_macs"] / row["compact_macs"])
        else:
            assert row["ideal_basis"] == "decode_weight_bytes" and row["decode_tokens"] == 4
            assert row["ideal"] == pytest.approx(row["dense_weight_bytes"] / row["compact_weight_bytes"])


def test_model_table_and_ort_vs_torch(results):
    dense, compact = results["models"]["dense"], results["models"]["compact"]
    assert dense["params"] > compact["params"] > 0
    for stats in (dense, compact):
        assert all(_positive(stats[k]) for k in ("weight_bytes", "decode_weight_bytes", "onnx_prefill_bytes",
                                                 "onnx_decode_bytes"))
    assert len(results["ort_vs_torch"]) == 8  # 2 stages x 2 models x (ort, genai)
    assert all(_positive(r["ort_speedup"]) for r in results["ort_vs_torch"])
    assert results["meta"]["threads"] == 1 and results["meta"]["runs"] == 2


def test_write_report_files(results, tmp_path):
    paths = write_report(results, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["rows"][0]["stage"] == "prefill"
    md = paths["md"].read_text()
    assert "| prefill | ort | 1x8 |" in md and "efficiency" in md
    for key in ("speedup_png", "efficiency_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_allocated_mb_is_the_peak_of_live_tensors_the_call_adds():
    held = [torch.zeros(2**18)]  # 1 MiB allocated before the call and freed in it: not subtracted

    def stage():
        a = torch.empty(2**20, dtype=torch.uint8)
        b = torch.empty(2**21, dtype=torch.uint8)  # peak: 3 MiB live
        del a, b
        held.clear()
        return torch.empty(2**20, dtype=torch.uint8)

    assert stage_allocated_mb(stage) == pytest.approx(3.0, abs=0.01)
