"""Widths read at run time from a config every layer shares: each rewritten module gets its own view of it."""

from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from zoo import tiny_phi3, token_ids

from loraprune import MagnitudeConfig, prune
from loraprune.models.save import load_pretrained, save_pretrained
from loraprune.passes.rewrite import masked_copy


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def phi3():
    torch.manual_seed(0)
    model = tiny_phi3()
    return model, prune(model, token_ids(), MagnitudeConfig(ratio=0.5))


@pytest.mark.parametrize("attention", ["auto", "query_heads", "kv_groups"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_phi3_gqa_with_per_layer_widths_equals_the_masked_model(attention, ratio):
    torch.manual_seed(0)
    model = tiny_phi3()
    result = prune(model, token_ids(), MagnitudeConfig(ratio=ratio, attention=attention))
    layers = result.model.model.layers
    heads = [result.plan.attention[f"model.layers.{i}.self_attn"]["heads"] for i in range(4)]
    assert heads[0] == heads[3] == 6 and layers[1].mlp.down_proj.in_features < 64  # first and last stay whole
    assert [layer.self_attn.config.num_attention_heads for layer in layers] == heads
    assert (layers[1].self_attn.config is result.model.config) == (heads[1] == 6)  # a view only where it differs
    x = token_ids(3, 11, seed=5)  # a batch and length not seen at trace time
    masked = masked_copy(model, result.groups, result.kept_units)
    torch.testing.assert_close(_logits(result.model, x), _logits(masked, x), atol=2e-5, rtol=1e-4)


def test_phi3_compact_generates_and_follows_the_shared_config(phi3):
    _, result = phi3
    compact = copy.deepcopy(result.model)
    view = compact.model.layers[1].self_attn.config
    assert view._shared is compact.config  # the copy's views read the copy's config
    out = compact.generate(token_ids(1, 5), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    reference = _logits(compact, token_ids())
    compact.set_attn_implementation("eager")  # changes the shared config only: every view sees it
    assert view._attn_implementation == "eager"
    torch.testing.assert_close(_logits(compact, token_ids()), reference, atol=2e-5, rtol=1e-4)
    again = pickle.loads(pickle.dumps(compact))
    torch.testing.assert_close(_logits(again, token_ids()), reference, atol=2e-5, rtol=1e-4)


def test_phi3_save_and_reload_gives_the_same_model(phi3, tmp_path):
    dense, result = phi3
    assert not result.model.config.loraprune_uniform
    loaded = load_pretrained(save_pretrained(result, tmp_path / "m"))
    x = token_ids(seed=1)
    torch.testing.assert_close(_logits(loaded, x), _logits(result.model, x), atol=1e-5, rtol=0)
    assert repr(loaded.model.layers[1].self_attn.config) == repr(result.model.model.layers[1].self_attn.config)


class SharedConfigAttention(nn.Module):
    """Reads its head count from the shared config at run time, as HF attention modules do (Phi-3)."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        width = self.config.num_attention_heads * self.head_dim
        q, k, v = (t.view(b, s, self.config.num_attention_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split(width, dim=-1))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, width))


class SharedConfigMLP(nn.Module):
    """A fused gate/up projection split by the MLP width read from the shared config at run time."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.config.intermediate_size, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


class SharedConfigBlock(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.attn, self.mlp = SharedConfigAttention(config), SharedConfigMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class SharedConfigModel(nn.Module):
    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=16, num_attention_heads=4, intermediate_size=24)
        self.blocks = nn.ModuleList(SharedConfigBlock(self.config) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_a_model_reading_widths_from_a_shared_config_runs_at_per_layer_widths():
    torch.manual_seed(0)
    model = SharedConfigModel().eval()
    # embeddings in, not token ids: the language-model selection asked for (first and last blocks whole)
    config = MagnitudeConfig(ratio=0.5, prune_hidden=False, exclude_first=0.1, exclude_last=True)
    result = prune(model, torch.randn(2, 5, 16), config)  # verified against the masked model
    blocks = result.model.blocks
    assert [b.attn.o.in_features for b in blocks] == [16, 8, 8, 16]
    assert [b.mlp.down.in_features for b in blocks] == [24, 12, 12, 24]
    assert blocks[0].attn.config is blocks[0].mlp.config is result.model.config
    assert result.model.config.num_attention_heads == 4 and result.model.config.intermediate_size == 24
    assert (blocks[1].attn.config.num_attention_heads, blocks[1].mlp.config.intermediate_size) == (2, 12)
    assert blocks[1].attn.config.hidden_size == 16  # read from the shared config
