"""Saving compact models as HF folders and loading them back: uniform and non-uniform, atomic, no pickle."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM
from zoo import tiny_gpt2, tiny_llama, token_ids

import loraprune.models.save as save_mod
from loraprune.api import prune
from loraprune.config import MagnitudeConfig
from loraprune.models.save import PLAN_FILE, WEIGHTS_FILE, load_pretrained, save_pretrained

torch.set_num_threads(1)

CASES = {
    # GQA kept after pruning (8 query heads over 2 KV heads -> 4 over 2), tied embeddings
    "llama-uniform": (lambda: tiny_llama(heads=8, kv_heads=2, tie=True), "uniform"),
    "llama-global": (lambda: tiny_llama(heads=8, kv_heads=2), "global"),  # MLP widths differ per layer
    "gpt2-uniform": (tiny_gpt2, "uniform"),
    "gpt2-global": (tiny_gpt2, "global"),  # head counts and MLP widths differ per layer
}


@pytest.fixture(scope="module")
def pruned():
    cache = {}

    def get(case):
        if case not in cache:
            make, scope = CASES[case]
            torch.manual_seed(0)
            dense = make()
            config = MagnitudeConfig(ratio=0.5, scope=scope, exclude_first=0, exclude_last=False)
            cache[case] = (dense, prune(dense, (token_ids(),), config))
        return cache[case]

    return get


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_same_logits(pruned, case, tmp_path):
    dense, result = pruned(case)
    uniform = result.model.config.loraprune_uniform
    assert uniform == (CASES[case][1] == "uniform")
    out = save_pretrained(result, tmp_path / "m", plan=result.plan, dense_config=dense.config)
    assert out == tmp_path / "m" and (out / WEIGHTS_FILE).is_file() and (out / PLAN_FILE).is_file()
    assert (out / "config.json").is_file()
    assert _siblings(out) == []  # no temp folder left behind
    for f in out.rglob("*"):  # safetensors + JSON only: nothing pickled
        assert f.suffix not in (".bin", ".pt", ".pth", ".pkl", ".pickle"), f
        assert not f.read_bytes().startswith(b"PK\x03\x04"), f  # torch.save zip archives
    saved = json.loads((out / PLAN_FILE).read_text())
    assert saved["dense_config"]["model_type"] == dense.config.model_type
    assert saved["kept"] and saved["shapes"]

    x = token_ids(seed=1)
    loaded = load_pretrained(out)
    assert not loaded.training
    torch.testing.assert_close(_logits(loaded, x), _logits(result.model, x), atol=1e-5, rtol=0)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == \
        {k: v.shape for k, v in result.model.state_dict().items()}
    if dense.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    for name, buf in loaded.named_buffers():
        assert buf.device.type == "cpu" and torch.isfinite(buf.float()).all(), name
    assert all(p.device.type == "cpu" for p in loaded.parameters())

    # the written config tells the truth: when it claims uniform, plain HF loading gives the same model
    if json.loads((out / "config.json").read_text())["loraprune_uniform"]:
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(_logits(plain, x), _logits(result.model, x), atol=1e-5, rtol=0)


def test_uniform_llama_reloads_with_plain_from_pretrained(pruned, tmp_path):
    dense, result = pruned("llama-uniform")
    out = save_pretrained(result, tmp_path / "m", dense_config=dense.config)
    config = json.loads((out / "config.json").read_text())
    assert config["loraprune_uniform"] is True
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    x = token_ids(seed=2)
    torch.testing.assert_close(_logits(plain, x), _logits(result.model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llama-uniform", "gpt2-global"])
def test_generate_on_reloaded(pruned, case, tmp_path):
    dense, result = pruned(case)
    loaded = load_pretrained(save_pretrained(result, tmp_path / "m", dense_config=dense.config))
    x = token_ids(batch=1, seq=5, seed=3)
    kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    got = loaded.generate(x, **kwargs)
    assert got.shape == (1, 11)
    assert torch.equal(got, result.model.generate(x, **kwargs))


def test_dtype_cast_keeps_rotary_float32(pruned, tmp_path):
    dense, result = pruned("llama-uniform")
    out = save_pretrained(result, tmp_path / "m", dense_config=dense.config)
    loaded = load_pretrained(out, dtype=torch.bfloat16)
    assert loaded.get_input_embeddings().weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, result.model.model.rotary_emb.inv_freq)


def test_tokenizer_saved(pruned, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    dense, result = pruned("gpt2-uniform")
    out = save_pretrained(result, tmp_path / "m", dense_config=dense.config, tokenizer=tokenizer)
    assert (out / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [1, 2]


def test_existing_out_dir(pruned, tmp_path):
    dense, result = pruned("gpt2-uniform")
    out = save_pretrained(result, tmp_path / "m", dense_config=dense.config)
    with pytest.raises(FileExistsError, match="already exists"):
        save_pretrained(result, out, dense_config=dense.config)
    (out / "marker.txt").write_text("old")
    save_pretrained(result, out, dense_config=dense.config, force=True)  # ours: replaced
    assert not (out / "marker.txt").exists() and (out / PLAN_FILE).is_file()
    assert _siblings(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained(result, empty, dense_config=dense.config, force=True)  # empty: fine too
    assert (empty / WEIGHTS_FILE).is_file()


def test_stranger_folder_refused_even_with_force(pruned, tmp_path):
    dense, result = pruned("gpt2-uniform")
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"meow")
    for force in (False, True):
        with pytest.raises(FileExistsError) as err:
            save_pretrained(result, stranger, dense_config=dense.config, force=force)
        assert "\n" not in str(err.value) and str(stranger) in str(err.value)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(FileExistsError):
        save_pretrained(result, a_file, dense_config=dense.config, force=True)
    assert (stranger / "cat.jpg").read_bytes() == b"meow" and sorted(os.listdir(stranger)) == ["cat.jpg"]
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_save_leaves_nothing(pruned, tmp_path, monkeypatch, exc):
    dense, result = pruned("llama-global")
    written = []

    def boom(path, data):  # the weights and config are already in the temp folder by now
        written.extend(sorted(p.name for p in path.parent.iterdir()))
        raise exc

    monkeypatch.setattr(save_mod, "_write_json", boom)
    out = tmp_path / "m"
    with pytest.raises(type(exc)):
        save_pretrained(result, out, dense_config=dense.config)
    assert WEIGHTS_FILE in written
    assert sorted(os.listdir(tmp_path)) == []  # neither out_dir nor a temp sibling

    monkeypatch.undo()
    save_pretrained(result, out, dense_config=dense.config)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(save_mod, "_write_json", boom)
    with pytest.raises(type(exc)):
        save_pretrained(result, out, dense_config=dense.config, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous folder is untouched
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_wrong_dense_config_refused_before_writing(pruned, tmp_path):
    dense, result = pruned("llama-uniform")
    with pytest.raises(ValueError, match="dense_config"):
        save_pretrained(result, tmp_path / "m", dense_config=result.model.config)  # the compact one
    with pytest.raises(ValueError, match="model_type"):
        save_pretrained(result, tmp_path / "m", dense_config={"hidden_size": 64})
    assert sorted(os.listdir(tmp_path)) == []


def test_load_errors_name_the_path(pruned, tmp_path):
    dense, result = pruned("gpt2-uniform")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    out = save_pretrained(result, tmp_path / "m", dense_config=dense.config)

    def check(exc_type, name):
        with pytest.raises(exc_type) as err:
            load_pretrained(out)
        message = str(err.value)
        assert "\n" not in message and str(out / name) in message, message

    plan_text = (out / PLAN_FILE).read_text()
    (out / PLAN_FILE).write_text(plan_text[: len(plan_text) // 2])
    check(ValueError, PLAN_FILE)
    (out / PLAN_FILE).write_text(json.dumps({"version": 1, "kept": {}, "shapes": {}}))
    check(ValueError, PLAN_FILE)  # no dense_config
    (out / PLAN_FILE).unlink()
    check(FileNotFoundError, PLAN_FILE)
    (out / PLAN_FILE).write_text(plan_text)
    weights = (out / WEIGHTS_FILE).read_bytes()
    (out / WEIGHTS_FILE).write_bytes(weights[:100])
    check(ValueError, WEIGHTS_FILE)
    (out / WEIGHTS_FILE).unlink()
    check(FileNotFoundError, WEIGHTS_FILE)
    (out / WEIGHTS_FILE).write_bytes(weights)
    load_pretrained(out)  # restored: loads again
