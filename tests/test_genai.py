"""ONNX Runtime GenAI: the folder `export_genai` writes runs in `onnxruntime_genai` and writes PyTorch's greedy
tokens, on pruned models whose layers keep different head counts; what GenAI cannot hold is refused in one line
before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM
from zoo import (
    VOCAB,
    tiny_deepseek_v3,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_phi,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen3,
)

from loraprune import MagnitudeConfig, prune
from loraprune.runtime.export import probe_kv_shapes
from loraprune.runtime.genai import CONFIG_NAME, GenAIUnsupported, export_genai, genai_generate, load_genai

NEW_TOKENS = 32
PROMPT = np.array([[40, 50, 60, 70, 80, 90, 100], [41, 51, 61, 71, 81, 91, 101]])


def tiny_gemma(layers: int = 4) -> GemmaForCausalLM:
    cfg = GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    return GemmaForCausalLM(cfg).eval()


ARCHITECTURES = {"llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3,
                 "gemma": tiny_gemma, "phi3": tiny_phi3, "phi": tiny_phi, "gpt2": tiny_gpt2}


def _pruned(build) -> tuple[torch.nn.Module, int]:
    """The model pruned at 0.5 by KV group, and its KV heads before."""
    torch.manual_seed(0)
    model = build(layers=4)  # the first and last of 4 layers stay whole (select.excluded_groups)
    kv_heads = probe_kv_shapes(model)[0].key_heads
    ids = torch.arange(5, 37).unsqueeze(0)
    return prune(model, ids, MagnitudeConfig(ratio=0.5, attention="kv_groups")).model.eval(), kv_heads


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_genai_greedy_tokens_equal_torch_generate(name, tmp_path, one_thread):
    model, dense_kv_heads = _pruned(ARCHITECTURES[name])
    heads = [s.key_heads for s in probe_kv_shapes(model)]
    folder = export_genai(model, tmp_path / "genai", eos_token_id=1 if model.config.eos_token_id is None else None)
    got = genai_generate(load_genai(folder), PROMPT, NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(PROMPT), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(got, ref.numpy())
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == len(heads) == 4
    if dense_kv_heads > 1:  # pruned by KV group in the middle layers only: head counts differ by layer
        assert len(set(heads)) == 2, heads


def test_genai_folder_layout_sampling_and_cuda_target(tmp_path, one_thread):
    model, _ = _pruned(tiny_llama)
    cuda = export_genai(model, tmp_path / "cuda", target="cuda")
    assert sorted(p.name for p in cuda.iterdir()) == [CONFIG_NAME, "model.onnx", "model.onnx.data"]
    config = json.loads((cuda / CONFIG_NAME).read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    assert config["search"]["past_present_share_buffer"] is False
    folder = export_genai(model, tmp_path / "cpu")
    genai = load_genai(folder)
    sampled = [genai_generate(genai, PROMPT[:1], 8, min_new_tokens=8, do_sample=True, temperature=0.8, top_k=5,
                              seed=seed) for seed in (1, 1, 2)]
    assert sampled[0].shape == (1, 15) and (sampled[0][:, :7] == PROMPT[:1]).all()
    np.testing.assert_array_equal(sampled[0], sampled[1])  # the seed fixes the draw
    export_genai(model, folder)  # an earlier GenAI folder is replaced, whole
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, "model.onnx", "model.onnx.data"]


def test_latent_attention_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(GenAIUnsupported, match=r"layer 0 caches keys as 1x16 and values as 1x8 \(latent or asymmetric"):
        export_genai(tiny_deepseek_v3(), tmp_path / "genai")
    assert not (tmp_path / "genai").exists() and not list(tmp_path.iterdir())


def test_an_encoder_is_refused(tmp_path):
    from zoo import tiny_bert

    with pytest.raises(GenAIUnsupported, match="not a causal language model"):
        export_genai(tiny_bert(), tmp_path / "genai")


def test_missing_or_corrupt_folders_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="export DIR --genai"):
        load_genai(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"model": {"type": "decoder", "decoder": {
        "filename": "model.onnx"}}}))
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="ONNX Runtime GenAI cannot load"):
        load_genai(tmp_path)
