"""The selection pass: the uniform scope cuts every group alike, the global one spends the same parameters where
scores are lowest, across layers and kinds, in the steps each group's mode allows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo import tiny_llama, token_ids

from loraprune import LoRAPruneConfig, MagnitudeConfig, prune
from loraprune.ir.groups import ChannelGroup
from loraprune.passes.dependency import analyze
from loraprune.passes.select import SelectConfig, select_units

WHOLE = {"exclude_first": 0.0, "exclude_last": False}


def _mlp(name: str, layer: int, units: int, params_per_unit: int) -> ChannelGroup:
    members = {(f"{name}.up.weight", 0): np.arange(units), (f"{name}.down.weight", 1): np.arange(units)}
    return ChannelGroup(name, "mlp", units, 1, members, layer=layer, unit_params=np.full(units, params_per_unit))


def test_global_takes_the_uniform_budget_from_the_lowest_scores():
    groups = [_mlp("a", 0, 10, 1), _mlp("b", 1, 10, 1)]
    scores = {"a": np.linspace(0.0, 1.0, 10), "b": np.linspace(2.0, 3.0, 10)}
    uniform = select_units(groups, scores, SelectConfig(ratio=0.3, **WHOLE))
    assert [len(uniform[g]) for g in "ab"] == [7, 7]
    kept = select_units(groups, scores, SelectConfig(ratio=0.3, scope="global", **WHOLE))
    assert kept["a"].tolist() == list(range(6, 10)) and len(kept["b"]) == 10  # the 6 units uniform removes


def test_global_weighs_units_by_the_parameters_they_take():
    # a's units cost 3 parameters each: uniform removes 3 + 3 units = 12 parameters; from a alone that is 4 units
    groups = [_mlp("a", 0, 10, 3), _mlp("b", 1, 10, 1)]
    scores = {"a": np.linspace(0.0, 1.0, 10), "b": np.linspace(2.0, 3.0, 10)}
    kept = select_units(groups, scores, SelectConfig(ratio=0.3, scope="global", **WHOLE))
    assert kept["a"].tolist() == list(range(4, 10)) and len(kept["b"]) == 10


def test_global_removes_units_scored_minus_infinity_first_and_always():
    """LoRAPrune's schedule scores the units it already removed -inf: they must stay removed."""
    groups = [_mlp("a", 0, 10, 1), _mlp("b", 1, 10, 1)]
    b = np.linspace(2.0, 3.0, 10)
    b[[1, 3, 5, 7, 9]] = -np.inf
    kept = select_units(groups, {"a": np.linspace(0.0, 1.0, 10), "b": b},
                        SelectConfig(ratio=0.3, scope="global", **WHOLE))
    assert not set(kept["b"].tolist()) & {1, 3, 5, 7, 9}
    assert kept["a"].tolist() == list(range(1, 10))  # the budget's sixth unit: a's lowest


def test_global_widths_keep_round_to_and_min_keep():
    groups = [_mlp("a", 0, 16, 1), _mlp("b", 1, 16, 1)]
    scores = {"a": np.linspace(0.0, 1.0, 16), "b": np.linspace(0.5, 1.5, 16)}
    for ratio in (0.2, 0.5, 0.9):
        kept = select_units(groups, scores, SelectConfig(ratio=ratio, scope="global", round_to=4, min_keep=4,
                                                         **WHOLE))
        assert all(len(k) % 4 == 0 and len(k) >= 4 for k in kept.values()), (ratio, kept)


@pytest.mark.parametrize("attention", ["query_heads", "kv_groups"])
def test_global_gives_the_uniform_size_with_other_widths(attention):
    model = tiny_llama(layers=4, heads=8, kv_heads=4, inter=96)
    analysis = analyze(model, token_ids())
    config = dict(ratio=0.4, attention=attention, count_macs=False, **WHOLE)
    uniform = prune(model, token_ids(), MagnitudeConfig(**config), analysis=analysis)
    result = prune(model, token_ids(), MagnitudeConfig(scope="global", **config), analysis=analysis)
    # one shrink step of the costliest group bounds how far a budget spent in steps can land from it
    step = max(max(g.unit_params.max() * g.num_kv_units, g.kv_unit_params.max() + g.unit_params.max() *
                   g.num_units // g.num_kv_units) if g.kind == "attention" else g.unit_params.max()
               for g in analysis.groups if g.kind != "hidden")
    assert abs(result.report.params_after - uniform.report.params_after) <= step / 2
    widths = [(len(k), g.kind) for g in analysis.groups for k in [result.kept_units[g.name]] if g.kind != "hidden"]
    assert len({w for w, kind in widths if kind == "mlp"}) > 1  # not the uniform cut
    for g in analysis.groups:
        if g.kind == "attention":
            per_kv = np.bincount(g.kv_of_unit[result.kept_units[g.name]], minlength=g.num_kv_units)
            assert len(set(per_kv[per_kv > 0].tolist())) == 1  # GQA: every kept KV head keeps as many heads
    x = token_ids(2, 9, seed=3)
    assert torch.isfinite(result.model(x).logits).all()


@pytest.mark.parametrize("spread", [None, 0.1])
def test_the_schedule_shrinks_monotonically_under_the_global_scope(spread):
    model = tiny_llama(layers=4, heads=4, kv_heads=2)
    batches = [token_ids(2, 12, seed=s) for s in range(4)]
    config = dict(ratio=0.5, count_macs=False, **WHOLE)
    result = prune(model, token_ids(), LoRAPruneConfig(scope="global", spread=spread, steps=20, update_every=2,
                                                       lr=1e-2, cooldown=0.1, progress=False, **config),
                   batches=batches)
    uniform = prune(model, token_ids(), MagnitudeConfig(**config))
    assert result.report.params_after < result.report.params_before
    assert abs(result.report.params_after - uniform.report.params_after) < 0.05 * result.report.params_before


def test_spread_zero_is_the_uniform_cut_and_a_spread_bounds_every_group():
    rng = np.random.default_rng(0)
    groups = [_mlp(name, layer, 20, 1) for layer, name in enumerate("abcd")]
    scores = {"a": rng.random(20) - 5.0, **{g: rng.random(20) for g in "bcd"}}  # unbounded: a is cut to one unit
    config = dict(ratio=0.4, **WHOLE)
    uniform = select_units(groups, scores, SelectConfig(**config))
    assert len(select_units(groups, scores, SelectConfig(scope="global", **config))["a"]) == 1
    for name, kept in select_units(groups, scores, SelectConfig(scope="global", spread=0.0, **config)).items():
        assert kept.tolist() == uniform[name].tolist()
    unbounded = select_units(groups, scores, SelectConfig(scope="global", **config))
    for name, kept in select_units(groups, scores, SelectConfig(scope="global", spread=1.0, **config)).items():
        assert kept.tolist() == unbounded[name].tolist()  # a spread of 1 bounds nothing
    bounded = select_units(groups, scores, SelectConfig(scope="global", spread=0.15, **config))
    assert all(12 - 3 <= len(k) <= 12 + 3 for k in bounded.values())  # uniform keeps 12; 0.15 x 20 = 3 either way
    assert sum(len(k) for k in bounded.values()) == sum(len(k) for k in uniform.values())  # the same budget
    assert len(bounded["a"]) == 9  # a, the lowest-scored, goes down to its bound


def test_spread_never_keeps_units_scored_minus_infinity():
    groups = [_mlp("a", 0, 10, 1), _mlp("b", 1, 10, 1)]
    a = np.linspace(0.0, 1.0, 10)
    a[:8] = -np.inf  # already removed by LoRAPrune's schedule, past any bound
    kept = select_units(groups, {"a": a, "b": np.linspace(2.0, 3.0, 10)},
                        SelectConfig(ratio=0.3, scope="global", spread=0.1, **WHOLE))
    assert kept["a"].tolist() == [8, 9]


def test_spread_is_checked():
    with pytest.raises(ValueError, match="spread must be >= 0"):
        SelectConfig(scope="global", spread=-0.1)
    with pytest.raises(ValueError, match="needs scope='global'"):
        SelectConfig(spread=0.1)
