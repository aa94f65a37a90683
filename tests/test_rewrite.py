"""The compact model equals the dense model with the removed channels zeroed (the rewrite invariant)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from zoo import LM_ZOO, tiny_bert, tiny_cnn, tiny_llama, token_ids

from loraprune import MagnitudeConfig, PlanError, PrunePlan, RandomConfig, apply_plan, prune
from loraprune.passes.rewrite import masked_copy

ALL = {**LM_ZOO, "bert": tiny_bert, "cnn": tiny_cnn, "llama_eager": lambda: tiny_llama(attn="eager")}


def outputs(model, x):
    with torch.no_grad():
        y = model(x)
    return getattr(y, "logits", None) if getattr(y, "logits", None) is not None else (
        y.last_hidden_state if hasattr(y, "last_hidden_state") else y)


def example(name):
    return torch.randn(2, 3, 8, 8) if name == "cnn" else token_ids()


def check_invariant(model, x, config):
    result = prune(model, x, config)
    masked = masked_copy(model, result.groups, result.kept_units)
    torch.testing.assert_close(outputs(result.model, x), outputs(masked, x), atol=2e-5, rtol=1e-4)
    return result


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("attention", ["query_heads", "kv_groups"])
@pytest.mark.parametrize(("scope", "ratio"), [("global", 0.25), ("uniform", 0.5)])  # each scope, each ratio once
def test_invariant_on_the_zoo(name, attention, scope, ratio):
    model = ALL[name]()
    config = MagnitudeConfig(ratio=ratio, scope=scope, attention=attention, exclude_first=0, exclude_last=False)
    result = check_invariant(model, example(name), config)
    assert result.report.params_after < result.report.params_before
    assert result.report.macs_after < result.report.macs_before
    # a new batch and sequence length, not seen at trace time
    x = example(name)
    x = torch.randn(3, 3, 6, 6) if name == "cnn" else token_ids(3, 11, seed=5)
    masked = masked_copy(model, result.groups, result.kept_units)
    torch.testing.assert_close(outputs(result.model, x), outputs(masked, x), atol=2e-5, rtol=1e-4)


def test_gqa_modes_shrink_the_right_projections():
    model = tiny_llama(layers=2, heads=8, kv_heads=4, hidden=64)
    cfg = dict(ratio=0.5, exclude_first=0, exclude_last=False)
    heads = prune(model, token_ids(), MagnitudeConfig(attention="query_heads", **cfg)).model
    attn = heads.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (32, 32, 1)
    groups = prune(model, token_ids(), MagnitudeConfig(attention="kv_groups", **cfg)).model
    attn = groups.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (32, 16, 2)
    assert groups.config.num_key_value_heads == 2 and groups.config.num_attention_heads == 4


def test_compact_model_generates():
    torch.manual_seed(0)  # weights independent of the tests before this one
    model = tiny_llama()
    result = prune(model, token_ids(), MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))
    out = result.model.generate(token_ids(1, 5), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_lora_factors_are_sliced_with_their_base_weights():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    config = MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False)
    result = check_invariant(peft_model, token_ids(), config)
    layer = result.model.base_model.model.model.layers[0]
    assert layer.mlp.gate_proj.lora_B["default"].weight.shape == (48, 4)
    assert layer.mlp.down_proj.lora_A["default"].weight.shape == (4, 48)
    assert layer.self_attn.q_proj.lora_A["default"].weight.shape == (4, 64)  # hidden untouched, rank kept
    merged = result.model.merge_and_unload()
    torch.testing.assert_close(outputs(merged, token_ids()), outputs(result.model, token_ids()), atol=1e-5, rtol=1e-4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.integers(1, 3), kv=st.integers(1, 3), rep=st.integers(1, 3), head_dim=st.sampled_from([4, 8]),
       inter=st.integers(3, 40), bias=st.booleans(), tie=st.booleans(), attn=st.sampled_from(["sdpa", "eager"]),
       ratio=st.floats(0.0, 0.9), scope=st.sampled_from(["uniform", "global"]),
       mode=st.sampled_from(["query_heads", "kv_groups"]))
def test_invariant_on_random_transformers(layers, kv, rep, head_dim, inter, bias, tie, attn, ratio, scope, mode):
    heads = kv * rep
    cfg = LlamaConfig(vocab_size=64, hidden_size=heads * (head_dim + 2), head_dim=head_dim, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tie, attn_implementation=attn)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, 64, (2, 7))
    check_invariant(model, x, MagnitudeConfig(ratio=ratio, scope=scope, attention=mode, exclude_first=0,
                                           exclude_last=False))


class ResidualMLP(nn.Module):
    def __init__(self, width, hidden, depth, residual):
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
                                    for _ in range(depth))
        self.out = nn.Linear(width, 3)
        self.residual = residual

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h) if self.residual else torch.relu(block(h))
        return self.out(h)


@settings(max_examples=12, deadline=None)
@given(width=st.integers(2, 12), hidden=st.integers(2, 12), depth=st.integers(1, 3), residual=st.booleans(),
       ratio=st.floats(0.0, 0.9), seed=st.integers(0, 100))
def test_invariant_on_random_mlps(width, hidden, depth, residual, ratio, seed):
    torch.manual_seed(seed)
    model = ResidualMLP(width, hidden, depth, residual).eval()
    check_invariant(model, torch.randn(4, 5), RandomConfig(ratio=ratio, exclude_first=0, exclude_last=False))


def test_hidden_pruning_shapes_and_bounded_change():
    model = tiny_llama(layers=2)
    x = token_ids()
    result = prune(model, x, MagnitudeConfig(ratio=0.1, prune_hidden=True, exclude_first=0, exclude_last=False))
    compact = result.model
    assert compact.model.embed_tokens.weight.shape[1] == 58 and compact.lm_head.in_features == 58
    assert compact.config.hidden_size == 58 and compact.model.norm.weight.shape == (58,)
    dense, small = outputs(model, x), outputs(compact, x)
    assert small.shape == dense.shape
    change = (small - dense).norm() / dense.norm()
    assert torch.isfinite(small).all() and change < 0.5


def test_ratio_zero_changes_nothing():
    model = tiny_llama()
    result = prune(model, token_ids(), MagnitudeConfig(ratio=0.0))
    assert result.report.params_after == result.report.params_before and not result.plan.kept
    torch.testing.assert_close(outputs(result.model, token_ids()), outputs(model, token_ids()))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match="ratio must be in"):
        prune(tiny_llama(), token_ids(), MagnitudeConfig(ratio=ratio))


def test_input_model_is_never_modified():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, token_ids(), MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plan_roundtrip_and_reapply_to_another_checkpoint(tmp_path):
    model = tiny_llama()
    result = prune(model, token_ids(), MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))
    path = result.plan.save(tmp_path / "plan.json")
    plan = PrunePlan.load(path)
    assert plan.kept == result.plan.kept
    torch.manual_seed(1)
    other = tiny_llama()  # same architecture, other weights (e.g. a later fine-tuned checkpoint)
    compact = apply_plan(other, plan)
    masked = masked_copy(other, result.groups, result.kept_units)
    torch.testing.assert_close(outputs(compact, token_ids()), outputs(masked, token_ids()), atol=2e-5, rtol=1e-4)


def test_plan_for_another_architecture_is_refused_and_model_untouched():
    plan = prune(tiny_llama(hidden=64), token_ids(),
                 MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False)).plan
    other = tiny_llama(hidden=32, heads=2, kv_heads=1)
    before = {k: v.shape for k, v in other.state_dict().items()}
    with pytest.raises(PlanError, match="another architecture"):
        apply_plan(other, plan, inplace=True)
    assert {k: v.shape for k, v in other.state_dict().items()} == before


def test_plan_naming_a_missing_parameter_is_refused():
    plan = PrunePlan(kept={"model.layers.9.mlp.up_proj.weight": {0: [0, 1]}}, shapes={})
    with pytest.raises(PlanError, match="model.layers.9.mlp.up_proj.weight"):
        apply_plan(tiny_llama(), plan)


def test_round_to_keeps_hardware_friendly_widths():
    result = prune(tiny_llama(inter=96), token_ids(),
                   MagnitudeConfig(ratio=0.3, round_to=8, exclude_first=0, exclude_last=False))
    assert all(layer.mlp.up_proj.out_features % 8 == 0 for layer in result.model.model.layers)


def test_excluded_layers_stay_whole():
    model = tiny_llama(layers=10)
    result = prune(model, token_ids(), MagnitudeConfig(ratio=0.5))
    widths = [layer.mlp.up_proj.out_features for layer in result.model.model.layers]
    assert widths[0] == 96 and widths[-1] == 96 and all(w == 48 for w in widths[1:-1])


def test_invariant_through_a_depthwise_conv():
    from test_dependency import Convs

    torch.manual_seed(0)
    check_invariant(Convs(transposed=False).eval(), torch.randn(2, 3, 8, 8),
                    MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))


class FixedHeadCount(nn.Module):
    """Attention whose code writes its head count as a literal: the rewrite has nothing to patch."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, 4, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, s, 16))


def test_a_model_that_cannot_run_at_the_new_sizes_is_a_clear_error():
    model = nn.Sequential(FixedHeadCount()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="compact Sequential does not run .*could not patch"):
        prune(model, torch.randn(2, 5, 16), MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_heads_merged_by_a_per_head_constant_keep_their_count():
    """MPT adds an ALiBi bias that differs per head, so its heads move as one unit that is never pruned: the
    rewrite must leave the head count alone (not set it to the one unit) while the MLP channels go."""
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(vocab_size=128, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2)).eval()
    config = MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False)
    result = check_invariant(model, token_ids(), config)
    assert [g.num_units for g in result.groups if g.kind == "attention"] == [1, 1]
    assert result.model.transformer.blocks[0].attn.n_heads == 4 and result.model.config.n_heads == 4
    assert result.model.transformer.blocks[0].ffn.up_proj.out_features == 128


def test_masked_copy_builds_its_indices_on_the_parameters_device():
    """Shape-only work on `meta` takes the path a GPU takes: an index built on the CPU would be refused there."""
    import numpy as np

    from loraprune import analyze

    model = tiny_llama()
    analysis = analyze(model, token_ids())
    kept = {g.name: np.arange(g.num_units // 2) for g in analysis.groups}
    masked = masked_copy(model.to("meta"), analysis.groups, kept)
    assert {p.device.type for p in masked.parameters()} == {"meta"}
