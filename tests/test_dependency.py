"""The dependency pass finds exactly the groups a person would draw, on every architecture of the zoo."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (
    LM_ZOO,
    tiny_bert,
    tiny_cnn,
    tiny_deepseek_v3,
    tiny_falcon_mqa,
    tiny_llama,
    tiny_llama4,
    tiny_mixtral,
    token_ids,
)

from loraprune import MagnitudeConfig, analyze, prune
from loraprune.passes.rewrite import masked_copy


def kinds(analysis, kind):
    return [g for g in analysis.groups if g.kind == kind]


def member_names(group):
    return {(p.split(".")[-2] + "." + p.split(".")[-1], d) for p, d in group.members}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_gqa_structure(attn):
    layers, heads, kv, hidden, inter = 3, 6, 2, 48, 80
    a = analyze(tiny_llama(layers, heads, kv, hidden, inter, attn=attn), token_ids())
    assert not a.frozen
    mlp, attention, hid = kinds(a, "mlp"), kinds(a, "attention"), kinds(a, "hidden")
    assert len(mlp) == layers and all(g.num_units == inter and g.unit_size == 1 for g in mlp)
    assert member_names(mlp[0]) == {("gate_proj.weight", 0), ("up_proj.weight", 0), ("down_proj.weight", 1)}
    assert len(attention) == layers
    for g in attention:
        assert (g.num_units, g.unit_size, g.num_kv_units) == (heads, hidden // heads, kv)
        assert member_names(g) == {("q_proj.weight", 0), ("o_proj.weight", 1)}
        assert {(p.split(".")[-2], d) for p, d in g.kv_members} == {("k_proj", 0), ("v_proj", 0)}
        assert g.kv_of_unit.tolist() == [h // (heads // kv) for h in range(heads)]  # repeat_kv's mapping
    assert len(hid) == 1 and hid[0].num_units == hidden
    # the hidden group spans the embedding, every norm and every projection's input/output
    expected = 1 + 1 + layers * (5 + 2 + 2) + 1  # embed, final norm, per layer (5 inputs, 2 outputs, 2 norms), lm_head
    assert len(hid[0].members) == expected


def test_sdpa_and_eager_give_the_same_groups():
    sdpa = analyze(tiny_llama(attn="sdpa"), token_ids())
    eager = analyze(tiny_llama(attn="eager"), token_ids())
    describe = [g.describe() for g in sdpa.groups]
    assert describe == [g.describe() for g in eager.groups]


@pytest.mark.parametrize("name", sorted(LM_ZOO))
def test_zoo_lms_have_layers_of_attention_and_mlp_and_one_hidden(name):
    a = analyze(LM_ZOO[name](layers=2), token_ids())
    assert not a.frozen
    assert len(kinds(a, "attention")) == 2 and len(kinds(a, "mlp")) == 2 and len(kinds(a, "hidden")) == 1
    for g in kinds(a, "attention"):
        assert g.unit_size == 16 and g.num_units == 4
    assert kinds(a, "hidden")[0].num_units == 64


def test_qwen2_biases_follow_their_rows():
    a = analyze(LM_ZOO["qwen2"](), token_ids())
    g = kinds(a, "attention")[0]
    assert ("q_proj.bias", 0) in member_names(g)
    assert {p.split(".")[-2] + "." + p.split(".")[-1] for p, _ in g.kv_members} >= {"k_proj.bias", "v_proj.bias"}


def test_gpt2_fused_qkv_splits_into_heads():
    a = analyze(LM_ZOO["gpt2"](), token_ids())
    g = kinds(a, "attention")[0]
    ids = g.members[(g.name + ".c_attn.weight", 1)]
    # Conv1D [in, out]: out columns are q | k | v; head h owns 16 columns in each of the three parts
    for part in range(3):
        assert ids[part * 64: (part + 1) * 64].tolist() == [i // 16 for i in range(64)]


@pytest.mark.parametrize("name, norms", [("qwen3", ("q_norm", "k_norm")), ("phi", ("q_layernorm", "k_layernorm"))])
def test_head_dim_norm_shared_by_the_heads_is_left_whole(name, norms):
    """A QK-norm weight over head_dim serves every head: heads stay prunable, the weight is nobody's member."""
    model = LM_ZOO[name]()
    a = analyze(model, token_ids())
    attention = kinds(a, "attention")
    assert len(attention) == 2 and all(g.num_units == 4 and g.unit_size == 16 for g in attention)
    members = {p for g in a.groups for p, _ in list(g.members) + list(g.kv_members)}
    assert not [p for p in members if any(f".{n}." in p for n in norms)]
    compact = prune(model, token_ids(), MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False)).model
    before, after = model.state_dict(), compact.state_dict()
    for key in [k for k in before if any(f".{n}." in k for n in norms)]:
        assert torch.equal(after[key], before[key])


class HeadGainAttention(nn.Module):
    """A per-head gain [heads, 1, 1] and a scale over head_dim [head_dim] that every head shares."""

    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.gain = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.scale = nn.Parameter(torch.rand(self.head_dim) + 0.5)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        q = q * self.gain * self.scale
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, -1)) + x


def test_per_head_gain_is_sliced_with_its_head_and_a_shared_scale_is_not():
    torch.manual_seed(0)
    model = nn.Sequential(HeadGainAttention()).eval()
    x = torch.randn(2, 5, 32)
    a = analyze(model, x)
    (g,) = kinds(a, "attention")
    assert g.num_units == 4 and ("0.gain", 0) in g.members
    assert not any(p == "0.scale" for p, _ in g.members)
    result = prune(model, x, MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))
    assert result.model[0].gain.shape == (2, 1, 1) and torch.equal(result.model[0].scale, model[0].scale)


def test_attention_module_that_is_the_model_itself_is_patched():
    torch.manual_seed(0)
    model = HeadGainAttention().eval()
    result = prune(model, torch.randn(2, 5, 32), MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))
    assert result.report.verify["ok"] and (result.model.num_heads, model.num_heads) == (2, 4)


class FixedPartitions(nn.Module):
    """Heads laid out in 2 partitions written as a literal (CodeGen's mp_num style), 2 heads in each."""

    def __init__(self):
        super().__init__()
        self.num_heads = 4
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        b, s, _ = x.shape
        parts = self.qkv(x).view(b, s, 2, -1)
        q, k, v = (t.reshape(b, s, -1, 4).transpose(1, 2) for t in parts.split(8, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, s, -1))


def test_heads_inside_fixed_partitions_stay_whole():
    """A view into partitions that each hold several heads could only shrink them all alike: the split-view
    check freezes those heads rather than let one partition lose a head, and reports the view."""
    model = nn.Sequential(FixedPartitions()).eval()
    a = analyze(model, torch.randn(2, 5, 16))
    assert not kinds(a, "attention")
    assert not [p for g in a.groups for p, _ in g.members if "qkv" in p]
    ((frozen),) = a.frozen
    assert frozen.op == "aten::view" and "2 rows of 24" in frozen.reason and "0.qkv.weight" in frozen.params


def test_falcon_qkv_laid_out_per_kv_group_is_pruned_by_heads_and_by_groups():
    """Falcon views its fused qkv as [kv groups, query heads + K + V, head_dim] and picks K and V by a constant
    index: each row of that view is one KV group, so its heads stay prunable in both attention modes."""
    model = LM_ZOO["falcon"]()
    a = analyze(model, token_ids())
    g = kinds(a, "attention")[0]
    qkv = (g.name + ".query_key_value.weight", 0)
    # rows per KV group: 2 query heads of 16, then K, then V; query rows belong to heads, K/V rows to KV units
    assert g.members[qkv].tolist() == [h // 16 if h < 32 else -1 for h in range(64)] + [
        2 + h // 16 if h < 32 else -1 for h in range(64)]
    assert g.kv_members[qkv].tolist() == [-1] * 32 + [0] * 32 + [-1] * 32 + [1] * 32
    cfg = dict(ratio=0.5, exclude_first=0, exclude_last=False)
    for attention, heads, kv in (("query_heads", 2, 2), ("kv_groups", 2, 1)):
        compact = prune(model, token_ids(), MagnitudeConfig(attention=attention, **cfg)).model
        attn = compact.transformer.h[0].self_attention
        assert (attn.num_heads, attn.num_kv_heads, attn.query_key_value.out_features) == (heads, kv,
                                                                                             (heads + 2 * kv) * 16)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_multi_query_key_broadcast_over_the_heads_is_a_copy_not_a_tie(attn):
    """Falcon-7B's multi-query eager attention multiplies 4 query heads by one K head broadcast along the head
    dim: like repeat_kv, the heads read copies of K, so they stay separate units of one KV group."""
    torch.manual_seed(0)
    model = tiny_falcon_mqa(attn)
    a = analyze(model, token_ids())
    assert [(g.num_units, g.num_kv_units, g.unit_size) for g in kinds(a, "attention")] == [(4, 1, 16)] * 2
    config = MagnitudeConfig(ratio=0.5, attention="query_heads", exclude_first=0, exclude_last=False)
    compact = prune(model, token_ids(), config).model
    assert compact.transformer.h[0].self_attention.query_key_value.out_features == (2 + 2) * 16


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_latent_attention_key_part_shared_by_all_heads_is_no_kv_head(attn):
    """DeepSeek's MLA writes each head's key into a new buffer: the head's own part from kv_b_proj, then a
    rotary part every head shares (expanded over the heads). That shared part stays whole; it is not a KV
    head, so the heads are plain units and the compact model still reads one key per head."""
    torch.manual_seed(0)
    model = tiny_deepseek_v3(attn)
    a = analyze(model, token_ids())
    assert not {f.op for f in a.frozen} & {"aten::new_empty", "aten::copy", "aten::slice_scatter"}  # (experts are)
    attention = kinds(a, "attention")
    assert [(g.num_units, g.num_kv_units) for g in attention] == [(4, 0)] * 2
    g = attention[0]
    # kv_b_proj rows per head: 8 key rows then 16 value rows, all the head's own
    assert g.members[(g.name + ".kv_b_proj.weight", 0)].tolist() == [h for h in range(4) for _ in range(24)]
    assert not [p for grp in a.groups for p, _ in grp.members if "kv_a_proj_with_mqa" in p]
    config = MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False)
    result = prune(model, token_ids(), config)
    attn_module = result.model.model.layers[0].self_attn
    assert (attn_module.num_heads, attn_module.num_key_value_groups, attn_module.o_proj.in_features) == (2, 1, 32)
    assert result.report.verify["ok"]
    out = result.model.generate(token_ids(1, 5), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_complex_rotary_keeps_heads_prunable():
    """Llama 4 rotates q and k as complex numbers: each (real, imaginary) pair of head_dim is one channel."""
    torch.manual_seed(0)
    model = tiny_llama4()
    a = analyze(model, token_ids())
    assert not {f.op for f in a.frozen} & {"aten::view_as_complex", "aten::view_as_real"}
    assert [(g.num_units, g.num_kv_units, g.unit_size) for g in kinds(a, "attention")] == [(4, 2, 16)] * 2
    result = prune(model, token_ids(), MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))
    assert result.report.verify["ok"] and result.model.model.layers[0].self_attn.q_proj.out_features == 32


class LiteralBuffer(nn.Module):
    """Channels written at literal positions of a new buffer: the positions cannot follow a pruned channel."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 6), nn.Linear(10, 4)

    def forward(self, x):
        buf = x.new_zeros(*x.shape[:-1], 10)
        buf[..., 2:8] = torch.relu(self.up(x))
        return self.down(buf)


def test_channels_written_at_literal_positions_move_as_one():
    a = analyze(LiteralBuffer(), torch.randn(2, 8))
    assert not a.frozen and not [g for g in a.groups if g.num_units > 1]
    result = prune(LiteralBuffer(), torch.randn(2, 8), MagnitudeConfig(ratio=0.5, exclude_first=0,
                                                                           exclude_last=False))
    assert result.model.up.out_features == 6


class PiecewiseActivation(nn.Module):
    """An activation built from comparisons and expm1 (Apertus' xIELU has this shape), with a learned scalar."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 4)
        self.alpha = nn.Parameter(torch.tensor(0.8))
        self.register_buffer("eps", torch.tensor(-1e-6))

    def forward(self, x):
        h = self.up(x)
        return self.down(torch.where(h > 0, self.alpha * h * h, torch.expm1(torch.min(h, self.eps)) - h))


def test_piecewise_activation_keeps_its_channels_prunable():
    a = analyze(PiecewiseActivation(), torch.randn(2, 8))
    assert not a.frozen and [g.num_units for g in a.groups] == [16]


class Tiled(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(32, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)).repeat(1, 2))


def test_repeat_makes_each_copy_of_a_channel_that_channel():
    a = analyze(Tiled(), torch.randn(2, 8))
    (g,) = a.groups
    assert g.members[("down.weight", 1)].tolist() == list(range(16)) * 2
    result = prune(Tiled(), torch.randn(2, 8), MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))
    assert result.model.down.in_features == 16


class GatherByInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, positions):
        return self.down(self.up(x)[..., positions])


class GatherTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, tokens):
        return self.down(torch.relu(self.up(x))[tokens])


def test_index_picks_channels_only_by_constant_positions_and_tokens_by_any():
    """Channels picked by positions known only at run time cannot be sliced; rows (tokens, as MoE routing
    gathers them) picked that way leave the channels as they are."""
    a = analyze(GatherByInput(), (torch.randn(2, 8), torch.arange(16)))
    assert [(f.op, f.reason.split(" (")[0]) for f in a.frozen] == [
        ("aten::index.Tensor", "channels picked by indices computed at run time")]
    assert not a.groups
    a = analyze(GatherTokens(), (torch.randn(6, 8), torch.tensor([4, 0, 2])))
    assert not a.frozen and [g.num_units for g in a.groups] == [16]


def test_attention_sinks_reduced_with_max_keep_heads_prunable():
    """GPT-OSS appends a learned sink logit per head and subtracts the row max (aten::max.dim) before softmax:
    the sinks are sliced with their heads."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256)
    model = GptOssForCausalLM(cfg).eval()
    a = analyze(model, token_ids())
    g = kinds(a, "attention")[0]
    assert g.num_units == 4 and (g.name + ".sinks", 0) in g.members
    result = prune(model, token_ids(), MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))
    assert result.model.model.layers[0].self_attn.sinks.shape == (2,)


def test_bloom_alibi_keeps_heads_whole_by_rule_not_by_omission():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)).eval()
    a = analyze(model, token_ids())
    assert not a.frozen and not kinds(a, "attention")  # baddbmm has a rule: ALiBi differs per head
    assert len(kinds(a, "mlp")) == 2
    prune(model, token_ids(), MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False))


def test_mixture_of_experts_keeps_its_routed_experts_and_prunes_attention():
    model = tiny_mixtral()
    a = analyze(model, token_ids())
    assert len(kinds(a, "attention")) == 2
    assert not [p for g in a.groups for p, _ in g.members if ".experts." in p]
    assert any("experts" in " ".join(f.params) for f in a.frozen)  # reported, not guessed at


def test_bert_hidden_is_the_output_so_it_stays_whole():
    a = analyze(tiny_bert(), token_ids())
    assert len(kinds(a, "attention")) == 2 and len(kinds(a, "mlp")) == 2 and not kinds(a, "hidden")


def test_cnn_residual_and_concat():
    a = analyze(tiny_cnn(), torch.randn(2, 3, 8, 8))
    hid = kinds(a, "hidden")
    assert len(hid) == 1 and hid[0].num_units == 16  # stem + residual add share 16 channels
    assert ("bn0.running_mean", 0) in hid[0].members
    channels = sorted((g.num_units, sorted(p for p, _ in g.members)) for g in kinds(a, "channel"))
    assert [c[0] for c in channels] == [8, 12, 24]
    head = [dict(g.members)[("head.weight", 1)] for g in kinds(a, "channel") if ("head.weight", 1) in g.members]
    # the concat maps branch_a to head columns 0..7 and branch_b to 8..19
    assert sorted(((ids >= 0).nonzero()[0].min(), (ids >= 0).nonzero()[0].max()) for ids in head) == [(0, 7), (8, 19)]


class Flipper(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)
        self.side_up = nn.Linear(8, 12)
        self.side_down = nn.Linear(12, 4)

    def forward(self, x):
        return self.down(torch.flip(self.up(x), dims=[-1])) + self.side_down(torch.relu(self.side_up(x)))


def test_unknown_op_freezes_and_is_reported():
    a = analyze(Flipper(), torch.randn(2, 8))
    assert [(f.op, f.reason) for f in a.frozen] == [("aten::flip", "no dependency rule for this op")]
    assert a.frozen[0].node.startswith("flip") and "up.weight" in a.frozen[0].params
    names = {p for g in a.groups for p in g.params}
    assert "up.weight" not in names and "down.weight" not in names
    assert [g.num_units for g in a.groups] == [12]  # the branch with known ops is still prunable


def test_meta_device_model_is_analyzed_from_shapes_alone():
    with torch.device("meta"):
        model = tiny_llama(layers=2)
    a = analyze(model, torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert len(kinds(a, "attention")) == 2 and kinds(a, "hidden")[0].num_units == 64


class Convs(nn.Module):
    """stem -> depthwise conv -> grouped conv -> transposed conv -> pooled linear head."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 1, groups=3)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2) if transposed else nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.pointwise(torch.relu(self.depthwise(self.stem(x))))
        return self.head(self.up(torch.relu(self.grouped(x))).mean(dim=(2, 3)))


def test_depthwise_conv_ties_in_and_out_channels_grouped_conv_goes_by_whole_groups():
    a = analyze(Convs(transposed=False), torch.randn(2, 3, 8, 8))
    assert not a.frozen
    by_members = {frozenset(p for p, _ in g.members): (g.num_units, g.unit_size) for g in a.groups}
    # stem out = depthwise in = depthwise out = pointwise in: one group of 8 channels
    assert by_members[frozenset({"stem.weight", "stem.bias", "depthwise.weight", "depthwise.bias",
                                 "pointwise.weight"})] == (8, 1)
    # the grouped conv's 3 groups: 4 input channels (pointwise rows) with their 4 output channels each
    assert by_members[frozenset({"pointwise.weight", "pointwise.bias", "grouped.weight", "grouped.bias",
                                 "up.weight"})] == (3, 4)
    assert by_members[frozenset({"up.weight", "up.bias", "head.weight"})] == (6, 1)
    assert sorted(g.name for g in a.groups) == ["model", "model#2", "model#3"]  # all at the root, told apart


def test_transposed_conv_has_no_rule_yet_so_it_is_frozen_and_reported():
    a = analyze(Convs(transposed=True), torch.randn(2, 3, 8, 8))
    assert [f.op for f in a.frozen] == ["aten::conv_transpose2d.input"] and "up.weight" in a.frozen[0].params
    assert all("up.weight" not in g.params and "head.weight" not in g.params for g in a.groups)


def test_decomposed_transposed_convolution_is_frozen_not_misread():
    """aten.convolution with transposed=True stores weights as [in, out/groups]: the rule must not read them."""
    exported = torch.export.export(Convs(transposed=True).eval(), (torch.randn(2, 3, 8, 8),))
    exported = exported.run_decompositions()  # lowers conv_transpose2d to aten.convolution(transposed=True)
    from loraprune.ir.trace import TracedProgram, _alias_table
    from loraprune.passes.dependency import build_groups

    model = Convs(transposed=True)
    params = {s.arg.name: s.target for s in exported.graph_signature.input_specs if s.target is not None}
    users = [s.arg.name for s in exported.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    a = build_groups(TracedProgram(exported, params, _alias_table(model), users))
    assert [(f.op, f.reason) for f in a.frozen] == [
        ("aten::convolution", "transposed convolution: its weight is [in, out/groups]")]
    assert "up.weight" in a.frozen[0].params
    assert all("up.weight" not in g.params for g in a.groups)


def test_a_rule_that_breaks_raises_and_says_where(monkeypatch):
    """Only a rule that declines (NoRule) freezes channels; any other error inside a rule is a bug: it keeps its
    type and traceback, with a note naming the rule and the node."""
    from loraprune.passes import rules

    def broken(ctx, node):
        raise ZeroDivisionError("a bug in the rule")

    monkeypatch.setitem(rules.RULES, "aten::silu", broken)
    with pytest.raises(ZeroDivisionError, match="a bug in the rule") as info:
        analyze(tiny_llama(), token_ids())
    assert any("dependency rule for aten::silu at node silu" in note for note in info.value.__notes__)


class Statistic(nn.Module):
    """up -> divided by a statistic over the tokens (dim 1 of [b, s, c]): every channel keeps its own -> down."""

    def __init__(self, statistic):
        super().__init__()
        self.up, self.down, self.statistic = nn.Linear(4, 16), nn.Linear(16, 4), statistic

    def forward(self, x):
        h = self.up(x)
        return self.down(h / self.statistic(h))


@pytest.mark.parametrize("statistic", [
    lambda h: torch.linalg.vector_norm(h, 2.0, dim=1, keepdim=True),  # ord before dim
    lambda h: torch.norm(h, p=2, dim=1, keepdim=True),
    lambda h: h.var(1, True, False).unsqueeze(1),  # unbiased before keepdim
    lambda h: h.std(1, unbiased=False, keepdim=True),
], ids=["linalg_vector_norm", "norm", "var", "std"])
def test_statistics_read_dim_and_keepdim_by_name(statistic):
    a = analyze(Statistic(statistic).eval(), torch.randn(2, 5, 4))
    assert not a.frozen and [(g.num_units, sorted(g.params)) for g in a.groups] == [
        (16, ["down.weight", "up.bias", "up.weight"])]


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, inner: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, inner, 1), nn.Conv2d(inner, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class PoolingNet(nn.Module):
    """Max pooling, padding, a roll over positions, squeeze-excitation, a grouped conv, average pooling, a
    per-channel L2 norm over positions and adaptive max pooling: channel-wise ops, all prunable through."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 24, 3)
        self.se = SqueezeExcite(24, 8)
        self.grouped = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.pointwise = nn.Conv2d(24, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.stem(x)), 2)
        x = self.se(torch.roll(self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect")), 1, dims=2))
        x = self.pointwise(F.avg_pool2d(torch.relu(self.grouped(x)), 2))
        x = x / (torch.linalg.vector_norm(x, 2, dim=(2, 3), keepdim=True) + 1e-3)
        return self.head(F.adaptive_max_pool2d(x, 1).flatten(1))


def test_pooling_padding_roll_and_grouped_conv_are_pruned_through():
    torch.manual_seed(0)
    model = PoolingNet().eval()
    result = prune(model, torch.randn(2, 3, 16, 16), MagnitudeConfig(ratio=0.3, exclude_first=0, exclude_last=False))
    assert result.report.frozen == [] and result.report.verify["ok"]
    compact = result.model
    assert compact.stem.out_channels < 16 and compact.se.reduce.out_channels < 8 and compact.pointwise.out_channels < 32
    assert (compact.grouped.groups, compact.grouped.in_channels, compact.grouped.out_channels) == (3, 18, 18)
    assert compact.conv.out_channels == compact.se.expand.out_channels == 18  # the grouped conv's groups of 6
    x = torch.randn(3, 3, 12, 12)  # another size than at trace time
    with torch.no_grad():
        torch.testing.assert_close(compact(x), masked_copy(model, result.groups, result.kept_units)(x),
                                   atol=2e-5, rtol=1e-4)


def test_a_module_whose_code_fixes_its_widths_is_frozen_and_reported_once():
    """nn.MultiheadAttention needs its inner width to be embed_dim: its heads and the width it reads stay whole,
    the MLP beside it is pruned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), Residual(nn.MultiheadAttention(16, 4, batch_first=True)),
                          Residual(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))),
                          nn.Linear(16, 3)).eval()
    result = prune(model, torch.randn(2, 5, 6), MagnitudeConfig(ratio=0.3, exclude_first=0, exclude_last=False))
    ((frozen),) = result.report.frozen
    assert (frozen["node"], frozen["op"]) == ("1.block", "torch.nn.modules.activation.MultiheadAttention")
    assert "embed_dim" in frozen["reason"] and "1.block.in_proj_weight" in frozen["params"]
    assert [g.kind for g in result.groups] == ["mlp"] and result.model[2].block[0].out_features == 22
    assert result.model[1].block.in_proj_weight.shape == (48, 16) and result.report.verify["ok"]


class Residual(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        if isinstance(self.block, nn.MultiheadAttention):
            return x + self.block(x, x, x, need_weights=False)[0]
        return x + self.block(x)


def _codegen(heads: int):
    from transformers import CodeGenConfig, CodeGenForCausalLM

    torch.manual_seed(0)
    config = CodeGenConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=heads, rotary_dim=4, n_positions=256,
                           bos_token_id=0, eos_token_id=0)
    return CodeGenForCausalLM(config).eval()


def test_heads_in_fixed_partitions_go_in_whole_partitions_or_stay_whole_and_reported():
    """CodeGen views its fused qkv_proj as 4 model-parallel partitions of [q | v | k]. With one head per partition
    a head is a partition: heads go, and the partition count follows them. With two heads per partition a head
    would need partitions of different widths: the heads stay whole, the view is reported, the MLP is pruned."""
    one = prune(_codegen(4), token_ids(), MagnitudeConfig(ratio=0.5))
    attn = one.model.transformer.h[0].attn
    assert one.report.verify["ok"] and one.report.frozen == []
    assert (attn.qkv_proj.out_features, attn.mp_num) == (96, 2)
    two = prune(_codegen(8), token_ids(), MagnitudeConfig(ratio=0.5))
    assert two.report.verify["ok"] and [g.kind for g in two.groups if g.kind != "hidden"] == ["mlp", "mlp"]
    assert [(f["op"], "fixed partitions" in f["reason"]) for f in two.report.frozen] == [("aten::view", True)] * 2
    assert "transformer.h.0.attn.qkv_proj.weight" in two.report.frozen[0]["params"]
    assert two.model.transformer.h[0].mlp.fc_in.out_features == 128


class NormedMLP(nn.Module):
    """A norm over all MLP channels (BitNet's ffn_sub_norm): only the hidden stream could still be pruned."""

    def __init__(self):
        super().__init__()
        self.embed, self.up, self.norm, self.down = nn.Linear(6, 16), nn.Linear(16, 32), nn.LayerNorm(32), \
            nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.down(self.norm(torch.relu(self.up(h)))))


def test_nothing_to_prune_says_what_prune_hidden_would_add_and_what_holds_the_rest():
    a = analyze(NormedMLP(), torch.randn(2, 6))
    line = a.nothing_to_prune("NormedMLP")
    assert line.startswith("nothing to prune in NormedMLP") and "outside the hidden stream" in line
    assert "--prune-hidden would make prunable: hidden (16 channels" in line and "up.weight" in line
    assert a.nothing_to_prune("NormedMLP", prune_hidden=True) is None
    a = analyze(GatherByInput(), (torch.randn(2, 8), torch.arange(16)))
    line = a.nothing_to_prune("GatherByInput")
    assert "--prune-hidden would not help" in line and "aten::index.Tensor x1" in line
    assert analyze(Tiled(), torch.randn(2, 8)).nothing_to_prune("Tiled") is None
