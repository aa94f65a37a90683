"""`loraprune compile` end to end on a tiny local model, the commands on its output, and robustness: every bad
input is one line on stderr, exit code 2 and no output folder; interruption leaves nothing; same seed, same
plan and figures."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from zoo import save_with_tokenizer, tiny_llama, write_gguf_of_unknown_architecture

from loraprune.cli import main
from loraprune.models.save import load_pretrained
from loraprune.runtime.attention import FUSED, read_attention_plan

FAST = ["--steps", "4", "--eval-window", "64", "--eval-windows", "4", "--gen-tokens", "4", "--bench-grid", "1x16",
        "--decode-tokens", "4", "--bench-runs", "2", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    torch.manual_seed(0)
    save_with_tokenizer(tiny_llama(layers=2), folder)
    return folder


@pytest.fixture(scope="module")
def compiled(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compiled") / "out"
    assert main(["compile", str(tiny_folder), "--criterion", "lora", "--ratio", "0.5", "--out", str(out), *FAST]) == 0
    return out


def _no_output(out: Path) -> bool:
    """Neither the folder nor a leftover temporary sibling."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_compile_writes_a_consistent_report_and_loadable_outputs(compiled, tiny_folder):
    report = json.loads((compiled / "report.json").read_text())
    for key in ("model", "ratio", "criterion", "params_before", "params_after", "macs_before", "macs_after",
                "groups", "ppl_before", "ppl_after", "timings", "bench"):
        assert key in report, key
    assert report["criterion"] == "lora" and report["ratio"] == 0.5
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert all(math.isfinite(report[k]) for k in ("ppl_before", "ppl_after", "ppl_after_onnx", "ppl_before_ood",
                                                  "ppl_after_ood"))
    assert report["eval_ood"]["windows"] == 4 and "common-licenses" in report["eval_ood"]["text"]
    assert report["verify"]["ok"] and report["onnx_parity"]["ok"]
    assert report["ppl_after_onnx"] == pytest.approx(report["ppl_after"], rel=1e-3)
    for graph in ("prefill", "decode"):  # every pruned layer still runs fused, with its own head counts
        assert report["onnx_attention"][graph] == {"op": "Attention", "layers": 2, "fused": 2, "unfused": {}}
    assert report["groups_pruned"] == {"attention": 2, "mlp": 2} and report["frozen"] == []
    assert report["finetune"]["kind"] == "lora_prune" and report["finetune"]["points"][-1]["ratio"] == 0.5
    assert all(g["onnx_matches_torch"] for g in report["generations"])
    stages = {(r["stage"], r["backend"]) for r in report["bench"]["rows"]}
    assert stages == {("prefill", "torch"), ("prefill", "ort"), ("decode", "torch"), ("decode", "ort")}
    for name in ("report.md", "quality.png", "finetune.png", "onnx/prefill.onnx", "onnx/decode.onnx",
                 "bench/bench.json", "bench/speedup.png", "model/model.safetensors"):
        assert (compiled / name).is_file(), name
    page = (compiled / "report.md").read_text()
    assert "held-out perplexity" in page and "out-of-domain perplexity" in page
    assert "LoRA fine-tuning: 4 steps" in page and "pissa init; LoRAPrune schedule, cool-down 0.5" in page
    model = load_pretrained(compiled / "model")
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert not list(compiled.parent.glob(".*tmp*"))  # no staging left behind


def test_commands_on_a_compiled_folder(compiled, capsys):
    assert main(["eval", str(compiled), "--eval-window", "64", "--eval-windows", "4", "--onnx"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((compiled / "report.json").read_text())
    assert result["ppl"] == pytest.approx(report["ppl_after"], rel=1e-5)  # the saved model is the evaluated one
    assert result["ppl_onnx"] == pytest.approx(report["ppl_after"], rel=1e-3)
    assert result["ppl_ood"] == pytest.approx(report["ppl_after_ood"], rel=1e-5)  # and the out-of-domain text
    assert result["ppl_ood_onnx"] == pytest.approx(report["ppl_after_ood"], rel=1e-3)
    outputs = {}
    for backend in ("ort", "torch"):
        assert main(["generate", str(compiled), "The import", "--max-new-tokens", "5", "--backend", backend]) == 0
        outputs[backend] = capsys.readouterr().out.strip()
    assert outputs["ort"] == outputs["torch"] and outputs["ort"].startswith("The import")
    assert main(["generate", str(compiled), "The import", "--backend", "genai"]) == 2  # no genai/ yet: one line
    assert "export DIR --genai" in capsys.readouterr().err
    assert main(["export", str(compiled), "--genai"]) == 0
    assert (compiled / "genai" / "genai_config.json").is_file() and (compiled / "genai" / "tokenizer.json").is_file()
    assert main(["generate", str(compiled), "The import", "--max-new-tokens", "5", "--backend", "genai"]) == 0
    assert capsys.readouterr().out.strip().endswith(outputs["torch"])
    assert main(["generate", str(compiled), ""]) == 2  # an empty prompt: one line on stderr, no traceback
    err = capsys.readouterr().err.strip()
    assert "prompt is empty" in err and len(err.splitlines()) == 1
    assert main(["export", str(compiled), "--fp16"]) == 0
    assert (compiled / "onnx" / "decode_fp16.onnx").is_file()
    capsys.readouterr()
    assert main(["bench", str(compiled), "--grid", "1x8", "--decode-tokens", "2", "--runs", "1", "--warmup", "0",
                 "--threads", "1"]) == 0
    assert "speedup" in capsys.readouterr().out
    assert json.loads((compiled / "bench" / "bench.json").read_text())["meta"]["grid"] == [[1, 8]]
    assert not list(compiled.glob(".bench-*"))
    assert read_attention_plan(compiled / "onnx" / "decode_fp16.onnx") == {  # fp16 graphs are fused too
        f"model.layers.{i}.self_attn": FUSED for i in range(2)}
    assert main(["export", str(compiled), "--opset", "18"]) == 0  # the unfused graphs, on request
    assert set(read_attention_plan(compiled / "onnx" / "prefill.onnx").values()) == {
        "opset 18 has no Attention op (needs 23)"}


def test_every_command_has_complete_help(capsys):
    from loraprune.cli import build_parser

    for command in ("compile", "inspect", "prune", "export", "bench", "eval", "generate"):
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args([command, "--help"])
        assert stop.value.code == 0
        text = capsys.readouterr().out
        assert "usage: loraprune" in text and len(text.splitlines()) > 5


def test_same_seed_gives_identical_plan_and_figures(tiny_folder, tmp_path):
    """On the default pipeline: flap scoring, then LoRA recovery."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["compile", str(tiny_folder), "--ratio", "0.3", "--out", str(out), "--no-bench", *FAST]) == 0
        report = json.loads((out / "report.json").read_text())
        for volatile in ("timings", "options"):
            report.pop(volatile)
        runs.append(((out / "model" / "loraprune_plan.json").read_text(), report))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    assert runs[0][1]["criterion"] == "flap" and runs[0][1]["finetune"]["kind"] == "lora_recover"


@pytest.mark.parametrize("criterion,extra,teacher", [
    ("taylor", ["--checkpointing"], "topk"),  # the default: half KL to the dense model's top 64 tokens
    ("magnitude", ["--distill", "0"], None),
    ("flap", ["--distill", "1", "--temperature", "2", "--teacher", "dense"], "dense"),
    ("flap", ["--teacher-topk", "5"], "topk")])
def test_one_shot_criteria_with_recovery(tiny_folder, tmp_path, criterion, extra, teacher):
    out = tmp_path / criterion
    assert main(["compile", str(tiny_folder), "--criterion", criterion, "--out", str(out), "--no-bench",
                 *extra, *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["kind"] == "lora_recover" and len(report["finetune"]["points"]) == 4
    assert report["params_after"] < report["params_before"] and report["verify"]["ok"]
    o = report["options"]
    assert report["finetune"]["distill"] == {None: 0.0, "topk": 0.5, "dense": 1.0}[teacher]
    teacher_bytes = {None: 0, "dense": report["params_before"] * 4,  # the dense model in fp32
                     "topk": 4 * o["batch_size"] * o["window"] * o["teacher_topk"] * (4 + 4)}  # int32 id, fp32 log-p
    assert report["finetune"]["teacher_bytes"] == teacher_bytes[teacher]
    md = (out / "report.md").read_text()
    assert ("next-token loss." in md) == (teacher is None)
    assert ("distillation from the dense model (KL share 1, temperature 2)" in md) == (teacher == "dense")
    assert (f"distillation from the dense model's top-{o['teacher_topk']} next-token distributions, computed "
            "before recovery (KL share 0.5, temperature 1)" in md) == (teacher == "topk")


def test_unknown_op_is_frozen_and_reported_and_the_run_goes_on(tiny_folder, tmp_path, monkeypatch):
    from loraprune.passes import rules

    silu = [op for op in rules.RULES if op.startswith("aten::silu")]
    assert silu
    for op in silu:  # the MLP's activation becomes an op without a rule
        monkeypatch.delitem(rules.RULES, op)
    out = tmp_path / "out"
    assert main(["compile", str(tiny_folder), "--criterion", "magnitude", "--ratio", "0.5", "--out", str(out),
                 "--no-bench", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert any("silu" in f["op"] for f in report["frozen"])
    assert "mlp" not in report["groups_pruned"] and report["groups_pruned"].get("attention")
    assert report["params_after"] < report["params_before"]


def _foreign_adapter(path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(hidden=32, inter=48), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(path)


BAD = {
    "missing model": (lambda d: [str(d / "nope")], "nope"),
    "corrupt gguf": (lambda d: (d / "bad.gguf").write_bytes(os.urandom(4096)) and [str(d / "bad.gguf")], "bad.gguf"),
    "unsupported gguf": (lambda d: write_gguf_of_unknown_architecture(d / "odd.gguf") or [str(d / "odd.gguf")],
                         "notanarch"),
    "ratio 1": (lambda d: ["TINY", "--ratio", "1.0"], "ratio must be in [0, 1)"),
    "ratio negative": (lambda d: ["TINY", "--ratio", "-0.1"], "ratio must be in [0, 1)"),
    "cooldown 1": (lambda d: ["TINY", "--cooldown", "1"], "cooldown must be in [0, 1)"),
    "foreign adapter": (lambda d: _foreign_adapter(d / "adapter") or ["TINY", "--adapter", str(d / "adapter")],
                        "made for another base model"),
    "empty data": (lambda d: (d / "e.txt").write_text("  \n") and ["TINY", "--data", str(d / "e.txt")],
                   "e.txt: file has no text"),
    "short data": (lambda d: (d / "s.txt").write_text("tiny text") and ["TINY", "--data", str(d / "s.txt")],
                   "text too short"),
    "bad data type": (lambda d: (d / "x.csv").write_text("a,b") and ["TINY", "--data", str(d / "x.csv")],
                      "unsupported file type"),
    "a GPU that is not there": (lambda d: ["TINY", "--device", "cuda:99"], "device 'cuda:99' was asked for"),
    "unknown device": (lambda d: ["TINY", "--device", "tpu"], "unknown device 'tpu'"),
    "distill share 2": (lambda d: ["TINY", "--distill", "2"], "distill must be in [0, 1]"),
    "top-k teacher of no tokens": (lambda d: ["TINY", "--teacher-topk", "0"], "teacher_topk must be >= 1"),
    "keep adapter without lora": (lambda d: ["TINY", "--keep-adapter"], "keep_adapter needs criterion 'lora'"),
    "missing out-of-domain text": (lambda d: ["TINY", "--ood-data", str(d / "nope.txt")], "nope.txt: no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_no_output(case, tiny_folder, tmp_path, capsys):
    make, needle = BAD[case]
    argv = [str(tiny_folder) if a == "TINY" else a for a in make(tmp_path)]
    out = tmp_path / "out"
    assert main(["compile", *argv, "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert err.startswith("loraprune compile: error:")
    assert _no_output(out)


def test_bf16_compile_for_a_cuda_target_on_the_cpu(compiled, tiny_folder, tmp_path, capsys):
    """The whole job in bf16 (LoRA factors and their optimiser state in fp32) with graphs for a CUDA target
    (GroupQueryAttention), run on the CPU: the rewrite verified within the bf16 bound, ONNX parity within its
    bound, perplexity within 5% of the fp32 run with the same options."""
    out = tmp_path / "bf16"
    assert main(["compile", str(tiny_folder), "--ratio", "0.5", "--out", str(out), "--device", "cpu",
                 "--dtype", "bf16", "--target", "cuda", *FAST]) == 0
    report, fp32 = (json.loads((folder / "report.json").read_text()) for folder in (out, compiled))
    assert report["placement"] == {"device": "cpu", "dtype": "bf16"}
    assert fp32["placement"] == {"device": "cpu", "dtype": "fp32"}
    assert report["verify"]["ok"] and report["verify"]["tolerance"] == 8 * torch.finfo(torch.bfloat16).eps
    assert report["onnx_parity"]["ok"] and report["onnx_parity"]["relative_diff"] <= report["onnx_parity"]["tolerance"]
    assert report["ppl_after"] == pytest.approx(fp32["ppl_after"], rel=0.05)
    assert report["ppl_after_onnx"] == pytest.approx(report["ppl_after"], rel=0.05)
    for graph in ("prefill", "decode"):
        assert report["onnx_attention"][graph] == {"op": "GroupQueryAttention", "layers": 2, "fused": 2,
                                                   "unfused": {}}
    assert sorted(p.name for p in (out / "onnx").glob("*.onnx")) == ["decode_cuda.onnx", "prefill_cuda.onnx"]
    assert all(g["onnx_matches_torch"] for g in report["generations"])
    assert load_pretrained(out / "model").dtype == torch.bfloat16  # saved as it ran
    assert "ran on cpu in bf16" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(out), "--onnx", "--eval-window", "64", "--eval-windows", "4", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)  # the folder's own (CUDA-target) graph, found without flags
    assert result["ppl_onnx"] == pytest.approx(report["ppl_after_onnx"], rel=1e-3)


def test_gpu_check_takes_its_whole_path_on_the_cpu(tiny_folder, tmp_path):
    """tools/gpu_check.py with --device cpu: compile, placement, fp16 far along the sequence, bench, the table."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "tools" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--model", str(tiny_folder), "--device", "cpu", "--dtype", "fp32",
                           "--steps", "2", "--positions", "48", "--bench-grid", "1x8", "--bench-runs", "1",
                           "--eval-window", "64", "--eval-windows", "2", "--gen-tokens", "2", "--threads", "1"]) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["compile"]["verify_ok"] and result["compile"]["parity_ok"]
    assert result["placement"]["ops"]["GroupQueryAttention"] == {"CPUExecutionProvider": 2}
    assert result["long_context"]["positions"] == 48 and result["long_context"]["top1_agreement"] >= 0.99
    assert {(r["stage"], r["backend"]) for r in result["bench"]["rows"]} == {
        (s, b) for s in ("prefill", "decode") for b in ("torch", "ort", "genai")}
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "speedup.png"]


def test_existing_output_needs_force_and_strangers_folders_are_never_replaced(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        assert main(["compile", str(tiny_folder), "--out", str(out), *FAST, *extra]) == 2
        err = capsys.readouterr().err
        assert "exists" in err and len(err.strip().splitlines()) == 1
        assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    assert main(["eval", str(out)]) == 2  # not a compile output
    assert "not a loraprune compile output" in capsys.readouterr().err


def test_force_replaces_an_earlier_compile(compiled, tiny_folder, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["compile", str(tiny_folder), "--out", str(out), "--no-bench", "--genai", *FAST]) == 0
    first = (out / "report.json").read_text()
    # genai/ links the decode graph the compile exported instead of exporting it again, and runs
    assert (out / "genai" / "decode.onnx").samefile(out / "onnx" / "decode.onnx")
    capsys.readouterr()
    outputs = []
    for backend in ("genai", "torch"):
        assert main(["generate", str(out), "The import", "--max-new-tokens", "5", "--backend", backend]) == 0
        outputs.append(capsys.readouterr().out.strip())
    assert outputs[0].endswith(outputs[1])
    assert main(["compile", str(tiny_folder), "--out", str(out), "--no-bench", "--ratio", "0.3", "--force",
                 *FAST]) == 0
    assert json.loads((out / "report.json").read_text())["ratio"] == 0.3 != json.loads(first)["ratio"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_compile_leaves_no_output_folder(sig, tiny_folder, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "loraprune", "compile", str(tiny_folder), "--out", str(out),
                             *FAST, "--steps", "2000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-500:]
    assert list(tmp_path.glob(".out.tmp-*")), "the run never reached its staging folder"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not out.exists()
    if sig == signal.SIGTERM:  # a catchable signal also removes the staging folder
        assert proc.returncode == 130 and _no_output(out)
        assert "interrupted" in proc.stderr.read().decode()


@pytest.mark.real_model
def test_compile_smollm2_short_setting(tmp_path):
    out = tmp_path / "smol"
    assert main(["compile", "--ratio", "0.2", "--out", str(out), "--steps", "2", "--batch-size", "1",
                 "--window", "64", "--eval-windows", "2", "--gen-tokens", "4", "--no-bench", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert all(math.isfinite(report[k]) for k in ("ppl_before", "ppl_after", "ppl_after_onnx", "ppl_before_ood",
                                                  "ppl_after_ood"))
    assert report["eval_ood"]["windows"] == 2 and "common-licenses" in report["eval_ood"]["text"]
    assert report["verify"]["ok"] and report["onnx_parity"]["ok"]
    assert report["groups"] == {"attention": 30, "mlp": 30, "hidden": 1}
    assert report["ppl_before"] < 40  # the dense model is the real, working SmolLM2


@pytest.mark.parametrize("input_adapter", [True, False], ids=["input-adapter", "pissa"])
def test_compile_keep_adapter(tiny_folder, tmp_path, capsys, input_adapter):
    """model/ + adapter/ reload to what was evaluated: with an input adapter (its factors seed the LoRA) and
    with a fresh PiSSA one (model/ then holds the residual base the adapter completes)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loraprune.models.load import load_model

    out = tmp_path / "out"
    extra = []
    if input_adapter:
        base = load_model(str(tiny_folder)).model
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(tmp_path / "adapter_in")
        extra = ["--adapter", str(tmp_path / "adapter_in")]
    assert main(["compile", str(tiny_folder), *extra, "--criterion", "lora", "--ratio", "0.5", "--keep-adapter",
                 "--out", str(out), "--no-bench", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verify"]["ok"] and report["options"]["lora_init"] == "pissa"
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # the input adapter (r=4, not the default 8) is the one that was trained and pruned
    assert saved["r"] == (4 if input_adapter else 8)
    assert saved["init_lora_weights"] is True  # loading must not run PiSSA's SVD again on the residual
    if input_adapter:
        assert report["adapter"] == str(tmp_path / "adapter_in")
    compact_base = load_pretrained(out / "model")
    reloaded = PeftModel.from_pretrained(compact_base, str(out / "adapter"))
    assert sum(p.numel() for n, p in reloaded.named_parameters() if "lora_" not in n) == report["params_after"]
    capsys.readouterr()
    assert main(["eval", str(out), "--eval-window", "64", "--eval-windows", "4"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]
    assert ppl == pytest.approx(report["ppl_after"], rel=1e-5)  # model/ + adapter/ is what was evaluated


def test_the_default_scope_is_global_with_the_measured_spread():
    from loraprune.pipeline import GLOBAL_SPREAD, CompileOptions

    assert CompileOptions().prune_config().scope == "global"
    assert CompileOptions().prune_config().spread == GLOBAL_SPREAD
    assert CompileOptions(spread=1.0).prune_config().spread == 1.0
    assert CompileOptions(scope="uniform").prune_config().spread is None
    with pytest.raises(ValueError, match="needs scope='global'"):
        CompileOptions(scope="uniform", spread=0.1)
