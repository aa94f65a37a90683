"""Data-parallel LoRA importance on HF Accelerate: one process equals `lora_criterion`, two gloo processes launched
with `accelerate launch` equal one process that sees both ranks' rows, with base weights whole or sharded by rows;
the main job on two processes; a sharded prune writes what one process would."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from loraprune import analyze
from loraprune.distributed import accelerated_lora_scores, tiny_batches, tiny_llama_model
from loraprune.lora.adapters import add_lora, lora_layers
from loraprune.parallel import shard_step
from loraprune.passes.criteria.lora import lora_criterion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def accelerator():
    """A single-process CPU Accelerator; its process-wide shared state is cleared afterwards."""
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def assert_same_scores(got, want, rtol=1e-5):
    assert set(got.units) == set(want.units) and set(got.kv) == set(want.kv)
    for table in ("units", "kv"):
        for name, ref in getattr(want, table).items():
            ref = np.asarray(ref)
            np.testing.assert_allclose(np.asarray(getattr(got, table)[name]), ref, rtol=rtol,
                                       atol=rtol * float(np.abs(ref).max() or 1.0), err_msg=f"{table} {name}")


def test_shard_step_splits_rows_and_deals_micro_batches():
    x = torch.arange(10).view(5, 2)
    parts = [shard_step(x, 2, r) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and [len(p[0]) for p in parts] == [3, 2]
    assert shard_step(x[:1], 2, 1) == []  # an empty share: the rank still joins the all-reduce with zeros
    d = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    assert shard_step(d, 2, 1)[0]["attention_mask"].shape == (2, 2)
    assert shard_step(["a", "b", "c"], 2, 0) == ["a", "c"] and shard_step(["a", "b", "c"], 2, 1) == ["b"]


def test_one_process_equals_lora_criterion(accelerator):
    model = tiny_llama_model(0)
    batches = tiny_batches(steps=3, rows=4, seq=16)
    groups = analyze(model, batches[0][:1]).groups
    keys = list(model.state_dict())
    got = accelerated_lora_scores(model, groups, batches, accelerator=accelerator, seed=0, r=8, alpha=16)
    assert list(model.state_dict()) == keys and not lora_layers(model)  # adapters added for scoring, removed
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # flags restored, no grads
    want = lora_criterion(model, groups, batches=batches, seed=0, r=8, alpha=16)
    assert_same_scores(got, want)


def test_micro_batches_weighted_by_tokens_equal_the_concatenated_step(accelerator):
    """A list step of two padded micro-batches with different token counts = one step of their concatenation."""
    torch.manual_seed(0)
    model = add_lora(tiny_llama_model(0), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # B != 0, so both terms of the gradient estimate matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = tiny_batches(steps=1, rows=4, seq=12, seed=3)[0]
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[3, 4:] = 0
    whole = {"input_ids": ids, "attention_mask": mask}
    micro = [{"input_ids": ids[:3], "attention_mask": mask[:3]}, {"input_ids": ids[3:], "attention_mask": mask[3:]}]
    groups = analyze(model, ids[:1]).groups
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    want = lora_criterion(model, groups, batches=[whole, whole])
    got = accelerated_lora_scores(model, groups, [micro, micro], accelerator=accelerator)
    assert_same_scores(got, want)
    assert lora_layers(model) and all(p.grad is None and not p.requires_grad for p in base)


def launch_two(tmp_path, *program: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` of two local gloo processes running `program` (a `-m module ...` or a script)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_", "MASTER_", "TORCHELASTIC"))}
    env |= {"OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    # `--cpu --num_processes 2` would run ONE process in accelerate 1.15 (its simple launcher needs an MPI hostfile
    # for multi-CPU); the torchrun-based `--multi_gpu` launcher starts two, and the program's CPU flag makes them
    # gloo CPU processes. HF_HOME in tmp: no accelerate default config from the user's home is read.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           *program]
    return subprocess.run(cmd, env=env, cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
def test_two_accelerate_processes_equal_one_process_on_the_union(tmp_path, sharded):
    """Two processes, base weights whole on each or sharded by rows (FSDP2), equal one process that sees both
    ranks' rows; sharded, no layer's scoring materialises more than its local rows (half the weight), and
    nothing is gathered."""
    out = tmp_path / "scores.npz"
    proc = launch_two(tmp_path, "-m", "loraprune.distributed", "--cpu", "--tiny-test", str(out), "--steps", "3",
                      "--rows", "4", "--seq", "16", *(["--sharded"] if sharded else []), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    saved = np.load(out)
    assert int(saved["world_size"]) == 2
    assert float(saved["max_rank_diff"]) == 0.0  # every rank ran the same update on the same reduced gradients
    if sharded:
        assert int(saved["layers_scored"]) == 3 * 14 and int(saved["gathered"]) == 0
        assert float(saved["largest_fraction"]) <= 0.5

    # one process, each step = both ranks' 2 rows (equal token counts: mean of the two ranks' mean-loss
    # gradients == gradient of the mean loss over the 4 rows)
    model = tiny_llama_model(0)
    batches = tiny_batches(steps=3, rows=4, seq=16)
    groups = analyze(model, batches[0][:1]).groups
    want = lora_criterion(model, groups, batches=batches, seed=0, r=8, alpha=16)
    assert {k for k in saved.files if ":" in k} == {f"units:{k}" for k in want.units} | {f"kv:{k}" for k in want.kv}
    for name, ref in want.units.items():
        np.testing.assert_allclose(saved[f"units:{name}"], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(),
                                   err_msg=name)
    for name, ref in want.kv.items():
        np.testing.assert_allclose(saved[f"kv:{name}"], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=name)


END_LAUNCH = """
import atexit, sys, torch, torch.distributed as dist
from loraprune.parallel import end_launch
dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
held = dist.group.WORLD if sys.argv[2] == "held" else None  # as FSDP2 holds its mesh's group
dist.all_reduce(torch.ones(4))
atexit.register(print, "interpreter finalised")
code = end_launch(3)
print("returned", code, "initialized", dist.is_initialized())
sys.exit(code)
"""


@pytest.mark.parametrize("held", [False, True], ids=["released", "held"])
def test_end_launch_destroys_the_groups_or_leaves_before_finalisation(tmp_path, held):
    """A gloo group alive when the interpreter finalises can abort the process (its worker thread drops the last
    tensors it kept and asks for the GIL): `end_launch` destroys the groups and returns the exit code, or, where
    something still holds a group, ends the process with that code before finalisation."""
    script = tmp_path / "end.py"
    script.write_text(END_LAUNCH)
    proc = subprocess.run([sys.executable, str(script), (tmp_path / "store").as_uri(), "held" if held else "free"],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 3, proc.stderr[-3000:]
    if held:
        assert "returned" not in proc.stdout and "interpreter finalised" not in proc.stdout
    else:
        assert "returned 3 initialized False" in proc.stdout and "interpreter finalised" in proc.stdout


# ----------------------------------------------------------------------------------------------- the main job

COMPILE = ["--ratio", "0.5", "--steps", "6", "--batch-size", "4", "--window", "16", "--lora-dropout", "0",
           "--distill", "0.5", "--eval-window", "32", "--eval-windows", "5", "--gen-tokens", "0",
           "--no-bench", "--threads", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    from zoo import save_with_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("models") / "tiny"
    torch.manual_seed(0)
    save_with_tokenizer(tiny_llama(layers=2), folder)
    return folder


@pytest.mark.parametrize("criterion", ["lora", "flap"])
def test_two_process_compile_equals_one_process_and_writes_once(tiny_model_folder, tmp_path, criterion):
    """LoRAPrune's schedule, and the default: flap scoring, then recovery (each with distillation)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loraprune.cli import main
    from loraprune.models.save import load_pretrained

    one, two = tmp_path / "one", tmp_path / "two"
    options = ["--criterion", criterion, *COMPILE]
    assert main(["compile", str(tiny_model_folder), "--out", str(one), *options]) == 0
    proc = launch_two(tmp_path, "-m", "loraprune", "compile", str(tiny_model_folder), "--out", str(two), *options)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("wrote ") == 1  # one process wrote and reported; the other waited
    assert (one / "model" / "loraprune_plan.json").read_text() == (two / "model" / "loraprune_plan.json").read_text()
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert (r1["processes"], r2["processes"]) == (1, 2)
    for key in ("ppl_before", "ppl_after", "ppl_before_ood", "ppl_after_ood"):  # evaluation sharded, then reduced
        assert r2[key] == pytest.approx(r1[key], rel=1e-4), key
    # one all-reduce per step of the LoRA factors' gradients (fp32) and two counters: the factor size, no more;
    # the schedule trains factors on the dense-sized model, recovery on the compact one
    if criterion == "lora":
        trained = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    else:
        trained = load_pretrained(one / "model")
    factors = sum(8 * (m.in_features + m.out_features) for m in linear_layers(trained))
    assert r2["finetune"]["allreduce_bytes_per_step"] == 4 * (factors + 2)
    assert not list(tmp_path.glob(".two.tmp-*"))


def test_sharded_prune_writes_the_one_process_compact_model(tmp_path, capsys):
    """`prune --shard` on two processes (weights sharded by rows, each read as its own slice of the checkpoint)
    writes a sharded checkpoint whose plan and weights are the one-process LoRA-criterion prune's. The model
    ties its embeddings and has an odd MLP width (shards of unequal size)."""
    from zoo import save_with_tokenizer, tiny_llama

    from loraprune import prune
    from loraprune.cli import _example_ids, _text_batches, main
    from loraprune.config import LoRAPruneConfig
    from loraprune.models.load import load_model
    from loraprune.models.save import load_pretrained

    tiny_model_folder = tmp_path / "tied"
    torch.manual_seed(0)
    save_with_tokenizer(tiny_llama(layers=2, inter=95, tie=True), tiny_model_folder)
    out = tmp_path / "sharded"
    proc = launch_two(tmp_path, "-m", "loraprune", "prune", str(tiny_model_folder), "--shard", "--criterion", "lora",
                      "--steps", "0", "--ratio", "0.5", "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("saved to") == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    assert not (out / "model.safetensors").exists() and not list(tmp_path.glob(".sharded.tmp-*"))

    loaded = load_model(str(tiny_model_folder))
    config = LoRAPruneConfig(ratio=0.5, steps=0, init="standard")
    batches = _text_batches(None, loaded.tokenizer, 4 * config.batch_size, config.batch_size, "lora")
    want = prune(loaded.model, (_example_ids(loaded.model),), config, batches=batches)
    plan = json.loads((out / "loraprune_plan.json").read_text())
    assert {p: {int(d): i for d, i in dims.items()} for p, dims in plan["kept"].items()} == want.plan.kept
    got = load_pretrained(out)
    assert got.state_dict().keys() == want.model.state_dict().keys()
    for name, tensor in want.model.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] == want.report.params_after and report["processes"] == 2
    assert report["weight_bytes_per_process"] < 0.55 * report["weight_bytes"]  # each held its rows only

    capsys.readouterr()
    assert main(["prune", str(tiny_model_folder), "--shard", "--criterion", "lora", "--steps", "0",
                 "--out", str(tmp_path / "alone")]) == 2  # not launched: one line, nothing written
    err = capsys.readouterr().err.strip()
    assert "accelerate launch" in err and len(err.splitlines()) == 1 and not (tmp_path / "alone").exists()


def test_a_replicated_tensor_is_cut_whole_by_its_owner():
    """A tensor no process shards (plain, or gathered for want of a row split) is cut on every dim by the plan."""
    from types import SimpleNamespace

    from loraprune.sharded import _assemble

    weight = torch.arange(20.0).view(4, 5)
    got = _assemble(weight, {0: [0, 3], 1: [1, 2, 4]}, [2, 3], 0, SimpleNamespace(rank=0, world=1))
    torch.testing.assert_close(got, weight[[0, 3]][:, [1, 2, 4]])


def linear_layers(model) -> list[torch.nn.Linear]:
    """The layers LoRA adapts: every linear one but the output head."""
    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]


FAILING_RANK = """
import os, sys
from loraprune import pipeline
from loraprune.cli import main

real = pipeline._perplexities


def failing(*args, **kwargs):  # rank 1 fails in the middle of the sharded evaluation
    if os.environ["RANK"] == "1":
        raise ValueError("injected failure")
    return real(*args, **kwargs)


pipeline._perplexities = failing
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_fails_stops_every_process_and_leaves_nothing(tiny_model_folder, tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    out = tmp_path / "out"
    start = time.monotonic()
    proc = launch_two(tmp_path, str(script), "compile", str(tiny_model_folder), "--out", str(out), *COMPILE,
                      "--collective-timeout", "60")
    assert proc.returncode != 0
    assert time.monotonic() - start < 200  # no hang: the launcher ends the other process
    lines = [line for line in proc.stderr.splitlines() if line.startswith("loraprune compile: error:")]
    assert "loraprune compile: error: rank 1: injected failure" in lines, proc.stderr[-4000:]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written
