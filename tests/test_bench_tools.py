"""The benchmark tools' bookkeeping: what `tools/bench_quality.py --resume` counts as done."""

import importlib.util
from pathlib import Path


def _bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality",
                                                  Path(__file__).parents[1] / "tools" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_skips_only_the_cells_of_the_same_scope_and_spread():
    rows = [{"ratio": 0.5, "criterion": "flap", "recovery": "next-token"},  # written before rows had a scope
            {"ratio": 0.5, "criterion": "flap", "recovery": "distill", "scope": "global", "spread": None},
            {"ratio": 0.2, "criterion": "flap", "recovery": "distill", "scope": "global", "spread": 0.05}]
    done = _bench_quality().done_cells
    assert done(rows, "uniform", None) == {(0.5, "flap", "next-token")}
    assert done(rows, "global", None) == {(0.5, "flap", "distill")}
    assert done(rows, "global", 0.05) == {(0.2, "flap", "distill")}
