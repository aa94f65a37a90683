"""Sweep: tiny random models of Hugging Face causal-LM architectures, most of them outside the test zoo, through
the whole pipeline: groups found, magnitude prune at 0.5 (verified against the masked model), LoRAPrune for
a few steps, ONNX export of both compact models and ORT logits against PyTorch's. It shows where the op rules
generalise and where a model keeps its heads whole. Every architecture whose config takes `num_key_value_heads`
also runs as a grouped-query variant ("<name>-GQA"): 6 query heads over 2 KV heads, in 4 layers so that the first
and last stay whole and the widths differ per layer (code that reads them from the config every layer shares, as
Phi-3's attention does, must still run).

    .venv/bin/python tools/sweep_architectures.py --out runs/sweep_architectures [--only Qwen3 Phi3-GQA]
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from loraprune import LoRAPruneConfig, MagnitudeConfig, prune
from loraprune.runtime.export import export_prefill
from loraprune.runtime.session import make_session

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, pad_token_id=0)
GPT_STYLE = dict(n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)

# architecture -> (config class, model class, config overrides)
ARCHITECTURES = {
    "Gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=32)),
    "Gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "Gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "Gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                             hidden_size_per_layer_input=16,
                                                             vocab_size_per_layer_input=VOCAB)),
    "Phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2)),
    "Phi": ("PhiConfig", "PhiForCausalLM", dict(num_key_value_heads=4, partial_rotary_factor=0.5, qk_layernorm=True)),
    "GPTNeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.25)),
    "StableLm": ("StableLmConfig", "StableLmForCausalLM", dict(num_key_value_heads=2, qk_layernorm=True,
                                                               use_qkv_bias=True)),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "Olmo": ("OlmoConfig", "OlmoForCausalLM", dict(num_key_value_heads=2)),
    "Olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2)),
    "Cohere": ("CohereConfig", "CohereForCausalLM", dict(num_key_value_heads=2, use_qk_norm=False)),
    "Granite": ("GraniteConfig", "GraniteForCausalLM", dict(num_key_value_heads=2, residual_multiplier=0.5,
                                                            embedding_multiplier=2.0, attention_multiplier=0.1,
                                                            logits_scaling=2.0)),
    "Starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(num_key_value_heads=2)),
    "SmolLM3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(num_key_value_heads=2, no_rope_layer_interval=2)),
    "Falcon": ("FalconConfig", "FalconForCausalLM", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "Falcon-MQA": ("FalconConfig", "FalconForCausalLM", dict(multi_query=True, parallel_attn=True)),
    "Bloom": ("BloomConfig", "BloomForCausalLM", dict(n_head=4, n_layer=2)),
    "GPTBigCode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(GPT_STYLE, multi_query=True)),
    "GPTJ": ("GPTJConfig", "GPTJForCausalLM", dict(GPT_STYLE, rotary_dim=8)),
    "CodeGen": ("CodeGenConfig", "CodeGenForCausalLM", dict(GPT_STYLE, rotary_dim=8)),
    "Mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "Qwen3Moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_key_value_heads=2, head_dim=16, num_experts=4,
                                                               num_experts_per_tok=2, moe_intermediate_size=32)),
    "Exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(num_key_value_heads=2)),
    "Glm": ("GlmConfig", "GlmForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "Helium": ("HeliumConfig", "HeliumForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "Mpt": ("MptConfig", "MptForCausalLM", dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2)),
    "Persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict()),
    "Nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "GPTNeo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(attention_types=[[["global", "local"], 1]], window_size=8)),
    "XGLM": ("XGLMConfig", "XGLMForCausalLM", dict(d_model=64, ffn_dim=96, num_layers=2, attention_heads=4)),
    "Arcee": ("ArceeConfig", "ArceeForCausalLM", dict(num_key_value_heads=2)),
    "Ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "Olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(num_key_value_heads=2)),
    "SeedOss": ("SeedOssConfig", "SeedOssForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "Apertus": ("ApertusConfig", "ApertusForCausalLM", dict(num_key_value_heads=2)),
    "Cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(num_key_value_heads=2, sliding_window=8)),
    "Glm4": ("Glm4Config", "Glm4ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "DiffLlama": ("DiffLlamaConfig", "DiffLlamaForCausalLM", dict(num_key_value_heads=2)),
    "BitNet": ("BitNetConfig", "BitNetForCausalLM", dict(num_key_value_heads=2)),
    "Ministral": ("MinistralConfig", "MinistralForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "HunYuanDenseV1": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "VaultGemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", dict(num_key_value_heads=2, head_dim=16,
                                                                     sliding_window=8)),
    "Jais2": ("Jais2Config", "Jais2ForCausalLM", dict(num_key_value_heads=2)),
    "NanoChat": ("NanoChatConfig", "NanoChatForCausalLM", dict(num_key_value_heads=2)),
    "MiniCPM3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                                                               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    "Qwen2Moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_key_value_heads=2, num_experts=4,
                                                               num_experts_per_tok=2, moe_intermediate_size=32,
                                                               shared_expert_intermediate_size=48)),
    "Olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
    "GptOss": ("GptOssConfig", "GptOssForCausalLM", dict(num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                                         num_experts_per_tok=2, sliding_window=8)),
    "Dots1": ("Dots1Config", "Dots1ForCausalLM", dict(num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                                                      moe_intermediate_size=32, first_k_dense_replace=2,
                                                      n_shared_experts=1)),
    "DeepseekV3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1)),
    "Llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(num_key_value_heads=2, head_dim=16, num_local_experts=2,
                                                             intermediate_size_mlp=96, interleave_moe_layer_step=2)),
}


GQA = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2)


def variants() -> dict[str, tuple[str, str, dict]]:
    """Every architecture, followed by its grouped-query variant where its config takes num_key_value_heads.
    Multi-head latent attention (a `kv_lora_rank`: DeepSeek-V3, MiniCPM3) has no KV-head grouping to vary: its
    keys come per query head from a latent all heads share, and its configs carry num_key_value_heads unused."""
    out = {}
    for name, (config_cls, model_cls, overrides) in ARCHITECTURES.items():
        out[name] = (config_cls, model_cls, overrides)
        if "num_key_value_heads" in inspect.signature(getattr(transformers, config_cls).__init__).parameters \
                and "kv_lora_rank" not in overrides:
            out[f"{name}-GQA"] = (config_cls, model_cls, {**overrides, **GQA})
    return out


SWEEP = variants()


def build(name: str) -> torch.nn.Module:
    config_cls, model_cls, overrides = SWEEP[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    return getattr(transformers, model_cls)(config).eval()


def ort_difference(model: torch.nn.Module, folder: Path) -> float:
    """Largest |ORT - PyTorch| logit difference of the exported prefill graph at a shape not used at export."""
    session = make_session(export_prefill(model, folder / "model.onnx"), threads=1)
    ids = torch.randint(2, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return float(np.abs(got - ref).max())


def sweep_one(name: str) -> dict:
    row: dict = {"architecture": name}
    stage = "build"
    try:
        model = build(name)
        ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
        stage = "prune"
        result = prune(model, ids, MagnitudeConfig(ratio=0.5))
        row["groups"] = {kind: sum(g.kind == kind for g in result.groups) for kind in
                         sorted({g.kind for g in result.groups})}
        row["params_removed"] = 1 - result.report.params_after / result.report.params_before
        compact = [result.model]
        nothing = result.analysis.nothing_to_prune(type(model).__name__)
        if nothing is None:  # LoRAPrune would stop with the same reason
            stage = "lora_prune"
            batches = [torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
            config = LoRAPruneConfig(ratio=0.5, steps=4, update_every=2, lr=1e-4, cooldown=0.1, progress=False,
                                     count_macs=False)
            lora = prune(model, ids, config, batches=batches)
            row["lora_params_removed"] = lora.report.params_removed_fraction
            compact.append(lora.model)
        stage = "onnx"
        with tempfile.TemporaryDirectory() as tmp:
            row["ort_max_abs_diff"] = max(ort_difference(m, Path(tmp)) for m in compact)
        row["status"] = "ok" if nothing is None else nothing
    except Exception as err:  # a row per failure: the sweep reports, it does not stop
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines()[0] if str(err) else ""  # no terminal colours
        row["status"] = f"failed at {stage}: {type(err).__name__}: {first}"
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| architecture | groups | params removed (magnitude, 0.5) | LoRAPrune | ORT max abs diff | status |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        groups = ", ".join(f"{k} {v}" for k, v in r.get("groups", {}).items()) or "-"
        fmt = {k: f"{r[k]:.2f}" if k in r else "-" for k in ("params_removed", "lora_params_removed")}
        diff = f"{r['ort_max_abs_diff']:.1e}" if "ort_max_abs_diff" in r else "-"
        lines.append(f"| {r['architecture']} | {groups} | {fmt['params_removed']} | {fmt['lora_params_removed']} "
                     f"| {diff} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sweep_architectures")
    parser.add_argument("--only", nargs="*", choices=sorted(SWEEP), default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.only or list(SWEEP)
    rows = [sweep_one(name) for name in tqdm(names, desc="architectures", unit="model")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"transformers": transformers.__version__, "rows": rows}, indent=2))
    (out / "sweep.md").write_text(f"transformers {transformers.__version__}; command: "
                                  f"`.venv/bin/python tools/sweep_architectures.py --out {args.out}`\n\n"
                                  + markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
