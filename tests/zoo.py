"""Tiny random models for tests: every architecture the passes must handle, built offline in milliseconds."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    Llama4ForCausalLM,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128


def tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64, inter: int = 96,
               attn: str = "sdpa", tie: bool = False) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=tie, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def tiny_mistral(layers: int = 2, attn: str = "sdpa") -> MistralForCausalLM:
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                        sliding_window=None, attn_implementation=attn)
    return MistralForCausalLM(cfg).eval()


def tiny_qwen2(layers: int = 2, attn: str = "sdpa") -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation=attn)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 2, attn: str = "sdpa") -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=256,
                     bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(cfg).eval()


def tiny_opt(layers: int = 2, attn: str = "sdpa") -> OPTForCausalLM:
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=layers, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0,
                    pad_token_id=1, attn_implementation=attn)
    return OPTForCausalLM(cfg).eval()


def tiny_qwen3(layers: int = 2, attn: str = "sdpa") -> Qwen3ForCausalLM:
    """QK-norm: one RMSNorm weight over head_dim, shared by every head."""
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      attn_implementation=attn)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_phi(layers: int = 2, attn: str = "sdpa") -> PhiForCausalLM:
    """QK LayerNorm over head_dim (weight and bias shared by the heads), partial rotary, parallel blocks."""
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5, qk_layernorm=True,
                    max_position_embeddings=256, attn_implementation=attn)
    return PhiForCausalLM(cfg).eval()


def tiny_phi3(layers: int = 4, attn: str = "sdpa") -> Phi3ForCausalLM:
    """One fused qkv_proj split by widths its attention reads from the config every layer shares; 6 query heads
    over 2 KV heads. Four layers, so the first and last stay whole by default and the widths differ per layer."""
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                     eos_token_id=1, bos_token_id=1, attn_implementation=attn)
    return Phi3ForCausalLM(cfg).eval()


def tiny_gptj(layers: int = 2, attn: str = "eager") -> GPTJForCausalLM:
    """Interleaved rotary (stack of the rotated pairs) on part of head_dim; eager attention only."""
    cfg = GPTJConfig(vocab_size=VOCAB, n_embd=64, n_inner=96, n_layer=layers, n_head=4, rotary_dim=8,
                     n_positions=256, bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return GPTJForCausalLM(cfg).eval()


def tiny_gpt_bigcode(layers: int = 2, attn: str = "sdpa") -> GPTBigCodeForCausalLM:
    """Multi-query attention in one fused c_attn, split by the module's own embed_dim / kv_dim attributes."""
    cfg = GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_inner=96, n_layer=layers, n_head=4, multi_query=True,
                           n_positions=256, bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return GPTBigCodeForCausalLM(cfg).eval()


def tiny_falcon(layers: int = 2, attn: str = "sdpa") -> FalconForCausalLM:
    """Falcon's new decoder: one fused qkv laid out per KV group (its query heads, then K, then V), K and V
    picked out by a constant index list, parallel attention and MLP."""
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                       max_position_embeddings=256, attn_implementation=attn)
    return FalconForCausalLM(cfg).eval()


def tiny_falcon_mqa(attn: str = "sdpa") -> FalconForCausalLM:
    """Falcon-7B's multi-query form: one K/V head that the attention broadcasts over 4 query heads."""
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                       attn_implementation=attn)
    return FalconForCausalLM(cfg).eval()


def tiny_mixtral(layers: int = 2) -> MixtralForCausalLM:
    """Mixture of experts: fused 3-D expert weights routed by data (not prunable), ordinary attention."""
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256)
    return MixtralForCausalLM(cfg).eval()


def tiny_deepseek_v3(attn: str = "sdpa") -> DeepseekV3ForCausalLM:
    """A dense first layer, then routed experts beside a shared expert, all with gate/up/down projections;
    multi-head latent attention (MLA): each head's key is its own part beside a rotary part all heads share."""
    cfg = DeepseekV3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
                           max_position_embeddings=256, attn_implementation=attn)
    return DeepseekV3ForCausalLM(cfg).eval()


def tiny_llama4() -> Llama4ForCausalLM:
    """Rotary in complex numbers (view_as_complex), and an MoE router that is an nn.Linear returning a tuple."""
    cfg = Llama4TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, intermediate_size_mlp=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_local_experts=2, interleave_moe_layer_step=2, max_position_embeddings=256)
    return Llama4ForCausalLM(cfg).eval()


def tiny_bert(layers: int = 2, attn: str = "sdpa") -> BertModel:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=256, attn_implementation=attn)
    return BertModel(cfg, add_pooling_layer=False).eval()


class TinyCNN(nn.Module):
    """conv-bn-relu stem, a residual block (add) and a concat of two branches, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.block_conv1 = nn.Conv2d(16, 24, 3, padding=1)
        self.block_bn1 = nn.BatchNorm2d(24)
        self.block_conv2 = nn.Conv2d(24, 16, 3, padding=1)
        self.branch_a = nn.Conv2d(16, 8, 1)
        self.branch_b = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = x + self.block_conv2(torch.relu(self.block_bn1(self.block_conv1(x))))
        y = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.head(y.mean(dim=(2, 3)))


def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    for m in model.modules():  # non-trivial running stats, so BN slicing is actually checked
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model


def token_ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)


LM_ZOO = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "gpt2": tiny_gpt2,
    "opt": tiny_opt,
    "qwen3": tiny_qwen3,
    "phi": tiny_phi,
    "gptj": tiny_gptj,
    "gpt_bigcode": tiny_gpt_bigcode,
    "falcon": tiny_falcon,
}


def save_with_tokenizer(model: nn.Module, folder) -> None:
    """A local HF folder as users have them: safetensors weights, config and a (character) tokenizer whose
    ids are the characters' code points (32..VOCAB-1; anything else is <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{chr(c): c for c in range(32, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    model.save_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)


def write_gguf_of_unknown_architecture(path) -> None:
    """A well-formed GGUF file whose architecture ("notanarch") no loader knows."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
