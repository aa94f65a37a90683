"""ONNX export and ONNX Runtime inference: PyTorch parity, greedy decoding, non-uniform (pruned) layers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from zoo import (
    tiny_deepseek_v3,
    tiny_falcon_mqa,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_mixtral,
    tiny_qwen2,
    token_ids,
)

from loraprune.runtime import attention
from loraprune.runtime.attention import FUSED, read_attention_plan
from loraprune.runtime.export import export_decode, export_prefill, probe_kv_shapes
from loraprune.runtime.generate import ort_generate
from loraprune.runtime.session import device_buffer, make_session, node_placement, run_with_iobinding

HEAD_DIM = 16  # tiny zoo models: hidden 64 / 4 heads


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine is shared: every test here runs torch on one thread (ORT sessions get threads=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    out = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None)
    out.weight.data = linear.weight.data[keep].clone()
    if linear.bias is not None:
        out.bias.data = linear.bias.data[keep].clone()
    return out


def _cols(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    out = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None)
    out.weight.data = linear.weight.data[:, keep].clone()
    if linear.bias is not None:
        out.bias.data = linear.bias.data.clone()
    return out


def _heads(heads: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])


def assert_prefill_matches(model: nn.Module, sess, ids: torch.Tensor) -> None:
    """The ORT prefill graph's logits on `ids` (full attention mask) equal PyTorch's."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    (got,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def nonuniform_llama() -> nn.Module:
    """A pruned-looking LLaMA whose config still says 4 heads / 2 KV heads / 96 MLP channels everywhere.

    Layer 0 keeps query heads 0 and 2 (one per KV head: 2 q, 2 kv); layer 1 keeps KV head 1 only (4 q, 1 kv)
    and 40 MLP channels. Only whole heads are sliced; head_dim stays 16.
    """
    torch.manual_seed(0)
    model = tiny_llama()
    a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    a0.q_proj, a0.o_proj = _rows(a0.q_proj, _heads([0, 2])), _cols(a0.o_proj, _heads([0, 2]))
    a0.num_key_value_groups = 1
    a1.k_proj, a1.v_proj = _rows(a1.k_proj, _heads([1])), _rows(a1.v_proj, _heads([1]))
    a1.num_key_value_groups = 4
    mlp = model.model.layers[1].mlp
    keep = torch.arange(0, 80, 2)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = _rows(mlp.gate_proj, keep), _rows(mlp.up_proj, keep), _cols(
        mlp.down_proj, keep)
    return model.eval()


MODELS = {"llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2,
          "nonuniform": nonuniform_llama}


@pytest.fixture(scope="module", params=list(attention.TARGETS))
def target(request) -> str:
    """Every graph test runs for both deployment targets: the CPU's standard Attention op and CUDA's
    GroupQueryAttention, the latter on ORT's CPU execution provider."""
    return request.param


@pytest.fixture(scope="module")
def decode_graphs(tmp_path_factory, target):
    """One decode export per model, shared by the tests below (exports dominate this file's runtime)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("decode")
    out = {}
    for name, build in MODELS.items():
        model = build()
        out[name] = (model, export_decode(model, root / f"{name}.onnx", target=target))
    return out


@pytest.fixture(scope="module")
def prefill_graphs(tmp_path_factory, decode_graphs, target):
    root = tmp_path_factory.mktemp("prefill")
    return {name: (decode_graphs[name][0], export_prefill(decode_graphs[name][0], root / f"{name}.onnx",
                                                          target=target))
            for name in ("llama", "gpt2", "nonuniform")}


@pytest.mark.parametrize("name", ["llama", "gpt2", "nonuniform"])
def test_prefill_matches_torch_at_unseen_shapes(prefill_graphs, name):
    model, path = prefill_graphs[name]
    onnx.checker.check_model(str(path))
    sess = make_session(path, threads=1)
    for batch, seq in [(1, 5), (3, 11)]:  # exported at batch 2, seq 8
        assert_prefill_matches(model, sess, token_ids(batch, seq, seed=seq))


def test_probe_reads_per_layer_kv_heads(decode_graphs):
    model, path = decode_graphs["nonuniform"]
    assert [s.key_heads for s in probe_kv_shapes(model)] == [2, 1]
    shapes = {i.name: i.shape for i in make_session(path, threads=1).get_inputs()}
    assert shapes["past_key_0"][1:] == [2, "past", HEAD_DIM]
    assert shapes["past_value_1"][1:] == [1, "past", HEAD_DIM]


@pytest.mark.parametrize("name", list(MODELS))
def test_decode_step_matches_torch_with_cache(decode_graphs, name):
    """Prompt at past 0 (batch 1), then one token at past 6 (batch 3): neither shape was used at export."""
    from transformers import DynamicCache

    model, path = decode_graphs[name]
    sess = make_session(path, threads=1)
    shapes = probe_kv_shapes(model)
    for batch, past_len in [(1, 0), (3, 6)]:
        ids = token_ids(batch, 4 if past_len == 0 else 1, seed=2)
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, past_len + ids.shape[1]), np.int64)}
        with torch.no_grad():
            cache = DynamicCache()
            if past_len:
                cache = model(input_ids=token_ids(batch, past_len, seed=1), past_key_values=cache).past_key_values
            for i, s in enumerate(shapes):
                empty_k = torch.zeros(batch, s.key_heads, 0, s.key_dim)
                empty_v = torch.zeros(batch, s.value_heads, 0, s.value_dim)
                k, v = (cache.layers[i].keys, cache.layers[i].values) if past_len else (empty_k, empty_v)
                feeds |= {f"past_key_{i}": k.numpy().copy(), f"past_value_{i}": v.numpy().copy()}
            mask = torch.from_numpy(feeds["attention_mask"])
            ref = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        got = sess.run(None, feeds)
        np.testing.assert_allclose(got[0], ref.logits.numpy(), atol=1e-4, rtol=1e-4)
        layers = ref.past_key_values.layers
        np.testing.assert_allclose(got[-1], layers[-1].values.numpy(), atol=1e-5)  # present_value_{last}


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_tokens_equal_torch_generate(decode_graphs, name):
    model, path = decode_graphs[name]
    ids = token_ids(2, 5, seed=3)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             pad_token_id=eos).numpy()
    got = ort_generate(None, make_session(path, threads=1), ids.numpy(), 8, eos_token_id=eos)
    np.testing.assert_array_equal(got, ref)


def test_greedy_left_padded_batch_equals_torch(decode_graphs):
    model, path = decode_graphs["llama"]
    ids, mask = token_ids(2, 6, seed=4), torch.ones(2, 6, dtype=torch.long)
    ids[0, :2], mask[0, :2] = 0, 0
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0)
    got = ort_generate(None, path, ids.numpy(), 8, eos_token_id=2, pad_token_id=0,
                       attention_mask=mask.numpy(), threads=1)
    np.testing.assert_array_equal(got, ref.numpy())


def test_prefill_with_cache_starts_the_loop(tmp_path, decode_graphs, target):
    model, dec = decode_graphs["nonuniform"]
    pre = export_prefill(model, tmp_path / "pre.onnx", with_cache=True, target=target)
    ids = token_ids(2, 5, seed=5).numpy()
    dec_sess = make_session(dec, threads=1)
    via_prefill = ort_generate(make_session(pre, threads=1), dec_sess, ids, 6)
    np.testing.assert_array_equal(via_prefill, ort_generate(None, dec_sess, ids, 6))
    sampled = ort_generate(None, dec_sess, ids, 6, do_sample=True, temperature=0.7, top_k=5, seed=1)
    assert sampled.shape == (2, 11) and (sampled[:, :5] == ids).all()


def test_prefill_without_cache_is_refused_as_loop_start(prefill_graphs, decode_graphs):
    with pytest.raises(ValueError, match="with_cache=True"):
        ort_generate(prefill_graphs["llama"][1], decode_graphs["llama"][1], np.zeros((1, 3), np.int64), 2)


def test_iobinding_run_matches_plain_run(prefill_graphs):
    sess = make_session(prefill_graphs["llama"][1], provider="cpu", threads=1)
    feeds = {"input_ids": token_ids(2, 4).numpy(), "attention_mask": np.ones((2, 4), np.int64)}
    (bound,) = run_with_iobinding(sess, feeds)
    np.testing.assert_array_equal(bound.numpy(), sess.run(None, feeds)[0])
    buffer = device_buffer(sess, bound.shape(), np.float32)
    (into,) = run_with_iobinding(sess, feeds, buffers={"logits": buffer})
    assert into.data_ptr() == buffer.data_ptr()  # written in place, not a new allocation
    np.testing.assert_array_equal(buffer.numpy(), bound.numpy())


def test_node_placement_reads_the_provider_of_every_node(decode_graphs, target):
    """What gpu_check asserts on CUDA (no attention or MatMul node on the CPU), read the same way here."""
    model, path = decode_graphs["nonuniform"]
    feeds = {"input_ids": token_ids(1, 4).numpy(), "attention_mask": np.ones((1, 4), np.int64)}
    session = make_session(path, provider="cpu", threads=1)
    feeds |= {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
              if i.name.startswith("past_")}
    placement = node_placement(path, feeds, provider="cpu", threads=1)
    attention_op = attention.TARGETS[target]
    assert placement[attention_op] == {"CPUExecutionProvider": len(_attention_nodes(path, attention_op))}
    assert {p for counts in placement.values() for p in counts} == {"CPUExecutionProvider"}
    assert "MatMul" in placement or "FusedMatMul" in placement or "Gemm" in placement


def _attention_nodes(path, op: str = "Attention") -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_attention_layer_is_one_fused_node(decode_graphs, name, target):
    """Each layer's attention becomes one node of the target's op with that layer's own head counts: opset 23's
    Attention for the CPU, GroupQueryAttention for CUDA (the non-uniform model's layers have 2 q/2 kv and
    4 q/1 kv heads; parity is checked by the tests above)."""
    model, path = decode_graphs[name]
    plan = read_attention_plan(path)
    assert len(plan) == model.config.num_hidden_layers and set(plan.values()) == {FUSED}
    op = attention.TARGETS[target]
    nodes = _attention_nodes(path, op)
    assert len(nodes) == len(plan) and attention.attention_summary(path)["op"] == op
    if op == "GroupQueryAttention" and name == "nonuniform":
        heads = [{a.name: a.i for a in n.attribute if a.name.endswith("num_heads")} for n in nodes]
        assert heads == [{"num_heads": 2, "kv_num_heads": 2}, {"num_heads": 4, "kv_num_heads": 1}]


def test_unfusable_layer_falls_back_to_unfused_graph(tmp_path, monkeypatch):
    """A layer a rule refuses runs the model's eager attention (MatMul/Softmax) in the graph; the other layer
    stays fused, the numbers stay equal to PyTorch, and the caller's model keeps its SDPA setting."""
    model = nonuniform_llama()
    refused = "model.layers.1.self_attn"
    monkeypatch.setattr(attention, "UNFUSABLE", [
        *attention.UNFUSABLE, lambda call: "refused by the test" if call.layer.endswith(refused) else None])
    mixed = export_prefill(model, tmp_path / "mixed.onnx")
    unfused = export_prefill(model, tmp_path / "unfused.onnx", opset=18)
    assert model.config._attn_implementation == "sdpa"
    plan = read_attention_plan(mixed)
    assert [v for k, v in sorted(plan.items())] == [FUSED, "refused by the test"]
    assert len(_attention_nodes(mixed)) == 1
    assert len(_attention_nodes(unfused)) == 0 and all("opset 18" in v for v in read_attention_plan(unfused).values())
    ids, mask = token_ids(3, 7, seed=7), torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding: fully masked rows must not leak into the real tokens
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    for path in (mixed, unfused):
        (got,) = make_session(path, threads=1).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        np.testing.assert_allclose(got[mask.bool().numpy()], ref[mask.bool().numpy()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, reason", [
    ({}, None), ({"opset": 18}, "opset 18"), ({"dropout": 0.1}, "dropout"),
    ({"kwargs": {"softcap": 30.0}}, "soft-capping"), ({"kwargs": {"s_aux": torch.zeros(4)}}, "sinks"),
    ({"query_heads": 6, "kv_heads": 4}, "not a multiple"), ({"target": "cuda", "opset": 18}, None),
    ({"target": "cuda", "causal": False}, "bidirectional"), ({"causal": False}, None),
])
def test_each_unfusable_rule_names_its_reason(change, reason):
    call = attention.AttentionCall(**{"layer": "l", "query_heads": 4, "kv_heads": 2, "dropout": 0.0,
                                      "opset": 23, "kwargs": {}} | change)
    found = [r for rule in attention.UNFUSABLE if (r := rule(call)) is not None]
    assert found == [] if reason is None else len(found) == 1 and reason in found[0]


def test_unfusable_layer_without_an_eager_fallback_is_a_clear_error(tmp_path, monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    monkeypatch.setattr(llama, "eager_attention_forward", None)  # as if the model file had none
    monkeypatch.setattr(attention, "UNFUSABLE", [lambda call: "refused by the test"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn: .*refused by the test.*no "
                                         r"eager_attention_forward") as err:
        export_prefill(tiny_llama(), tmp_path / "refused.onnx")
    assert "\n" not in str(err.value)  # the exporter's pages of advice are not passed on
    assert not (tmp_path / "refused.onnx").exists()


def test_model_that_refuses_custom_attention_is_exported_unrouted(tmp_path, monkeypatch):
    """No per-layer record then, but its SDPA calls still become fused nodes with the right numbers."""
    model = tiny_llama()

    def refuse(name):
        raise ValueError(f"{name} is not supported")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    path = export_prefill(model, tmp_path / "unrouted.onnx")
    assert read_attention_plan(path) == {} and len(_attention_nodes(path)) == 2
    ids = token_ids(2, 6, seed=8)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 6), np.int64)}
    (got,) = make_session(path, threads=1).run(None, feeds)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX model file"):
        make_session(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf")
    with pytest.raises(ValueError, match="not an ONNX model"):
        make_session(junk)
    with pytest.raises(FileNotFoundError):
        ort_generate(None, tmp_path / "missing.onnx", np.zeros((1, 2), np.int64), 1)


def test_failed_export_leaves_no_files(tmp_path, monkeypatch):
    """A failure after the graph was written (here: the checker) leaves the folder as it was."""
    old = tmp_path / "model.onnx"
    old.write_bytes(b"previous export")

    def failing_check(*args, **kwargs):
        raise onnx.checker.ValidationError("injected")

    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    with pytest.raises(onnx.checker.ValidationError):
        export_prefill(tiny_gpt2(), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert old.read_bytes() == b"previous export"


def test_export_optimizes_without_only_the_pairwise_slice_rule_and_gives_it_back(tmp_path, monkeypatch):
    """SlicesSplit's two-root pattern tries every pair of Slice nodes (most of a 30-layer model's optimizer time,
    for no match): an export runs the optimizer without it, and without nothing else; afterwards, failed or not,
    onnxscript has all its rules again."""
    from onnxscript import rewriter

    rules = rewriter._DEFAULT_REWRITE_RULES
    during = []

    def failing_check(*args, **kwargs):
        during.append(rewriter._DEFAULT_REWRITE_RULES)
        raise onnx.checker.ValidationError("injected")

    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    with pytest.raises(onnx.checker.ValidationError):
        export_prefill(tiny_gpt2(), tmp_path / "model.onnx")
    assert [getattr(r, "name", None) for r in rules if r not in during[0]] == ["SlicesSplit"]
    assert rewriter._DEFAULT_REWRITE_RULES is rules


def test_fp16_external_data_export_leaves_model_alone(tmp_path):
    """fp16 traces a copy (the fp32 model is untouched); forced external data lands beside the graph."""
    model = tiny_llama()
    before = model.lm_head.weight.detach().clone()
    path = export_decode(model, tmp_path / "dec16.onnx", fp16=True, external_data=True)
    assert model.lm_head.weight.dtype == torch.float32 and torch.equal(model.lm_head.weight, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec16.onnx", "dec16.onnx.data"]
    sess = make_session(path, threads=1)
    assert {i.type for i in sess.get_inputs() if i.name.startswith("past_")} == {"tensor(float16)"}
    ids = token_ids(1, 4).numpy()
    assert ort_generate(None, sess, ids, 3).shape == (1, 7)


def test_mixture_of_experts_exports_and_keeps_its_own_kernel(tmp_path):
    torch.manual_seed(0)
    model = tiny_mixtral()
    kernel = model.config._experts_implementation
    sess = make_session(export_prefill(model, tmp_path / "moe.onnx"), threads=1)
    assert model.config._experts_implementation == kernel  # switched for the export only
    assert_prefill_matches(model, sess, token_ids(2, 7, seed=3))


def test_sdpa_with_one_broadcast_kv_head_exports_as_one_kv_group(tmp_path):
    """Falcon's multi-query attention calls SDPA with one K/V head broadcast over the query heads; traced with
    enable_gqa it becomes one fused Attention node per layer (one KV group), and torch's SDPA is itself again
    afterwards."""
    torch.manual_seed(0)
    model = tiny_falcon_mqa()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    path = export_prefill(model, tmp_path / "mqa.onnx")
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Attention") == 2
    assert_prefill_matches(model, make_session(path, threads=1), token_ids(2, 7, seed=3))


def test_pruned_latent_attention_model_runs_in_ort_like_torch(tmp_path):
    """DeepSeek-V3 with half its MLA heads and MLP channels removed: prefill logits at an unseen shape and
    KV-cache greedy tokens (its cache holds the compressed latents) equal PyTorch's."""
    from loraprune import MagnitudeConfig, prune

    torch.manual_seed(0)
    config = MagnitudeConfig(ratio=0.5, exclude_first=0, exclude_last=False)
    model = prune(tiny_deepseek_v3(), token_ids(), config).model
    assert model.model.layers[0].self_attn.num_heads == 2
    assert_prefill_matches(model, make_session(export_prefill(model, tmp_path / "p.onnx"), threads=1),
                           token_ids(2, 7, seed=3))
    ids, eos = token_ids(3, 5, seed=3), model.generation_config.eos_token_id
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             pad_token_id=eos).numpy()
    got = ort_generate(None, make_session(export_decode(model, tmp_path / "d.onnx"), threads=1), ids.numpy(), 6,
                       eos_token_id=eos)
    np.testing.assert_array_equal(got, ref)


class _RunningMax(nn.Module):
    """An activation ONNX has no op for (aten.cummax)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=-1).values


def test_an_op_onnx_cannot_express_fails_in_one_line_naming_the_node(tmp_path):
    """The exporter's pages of advice about an op with no ONNX form become one line with the node and the
    reason, and nothing is left in the folder."""
    model = tiny_llama()
    model.model.layers[0].mlp.act_fn = _RunningMax()
    with pytest.raises(RuntimeError, match=r"ONNX export failed at node cummax \(.+\): No ONNX function") as info:
        export_prefill(model, tmp_path / "model.onnx")
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())


def test_fp16_graph_keeps_rotary_angles_exact_far_into_the_sequence(tmp_path, monkeypatch):
    """fp16 graphs keep the rotary frequencies (a buffer the model computes, never saved) in fp32: beyond 2,000
    positions the fp16 graph's logits stay within fp16 rounding of the fp32 graph's. With `inv_freq` cast to
    fp16 as well (what `Module.to(float16)` does) the angles' error grows with the position, and so does the
    logits' (observed 1.3e-2 there, against 6e-4)."""
    import loraprune.runtime.export as export

    model = tiny_llama(layers=2)
    with torch.no_grad():
        for layer in model.model.layers:  # sharp attention, so that the logits depend on the rotary angles
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    ids = token_ids(1, 2100, seed=1).numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def far_positions_error(name: str) -> float:
        fp16 = make_session(export_prefill(model, tmp_path / name, fp16=True), provider="cpu")
        got = fp16.run(["logits"], feeds)[0].astype(np.float32)
        return float(np.abs(got - reference)[0, 2000:].max() / np.abs(reference).max())

    reference = make_session(export_prefill(model, tmp_path / "fp32.onnx"), provider="cpu").run(["logits"], feeds)[0]
    bound = 4 * float(torch.finfo(torch.float16).eps)
    assert far_positions_error("fp16.onnx") < bound
    monkeypatch.setattr(export, "cast_weights", lambda module, dtype: module.to(dtype))
    assert far_positions_error("fp16_cast_inv_freq.onnx") > bound  # the check sees the error it guards against
