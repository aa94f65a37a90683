"""The public face: one verb with a typed config per method, a typed report, a package without import cycles
or import-time side effects."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch
from zoo import tiny_cnn, tiny_llama, token_ids

import loraprune
from loraprune import LoRAPruneConfig, MagnitudeConfig, RandomConfig, SelectConfig, TaylorConfig, prune
from loraprune.config import CONFIGS, config_from_dict, make_config

PACKAGE = Path(loraprune.__file__).parent

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("config", [MagnitudeConfig(ratio=0.3, scope="global"), RandomConfig(seed=4),
                                    TaylorConfig(batch_size=2, checkpointing=True),
                                    LoRAPruneConfig(ratio=0.5, steps=40, target=["q_proj"], init="standard")])
def test_configs_round_trip_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == config.criterion
    assert config_from_dict(data) == config


@pytest.mark.parametrize("build, needle", [
    (lambda: MagnitudeConfig(ratio=1.0), "ratio must be in"),
    (lambda: TaylorConfig(attention="heads"), "attention must be"),
    (lambda: TaylorConfig(batch_size=0), "batch_size must be >= 1"),
    (lambda: LoRAPruneConfig(steps=-1), "steps must be >= 0"),
    (lambda: LoRAPruneConfig(init="lottery"), "unknown LoRA init"),
    (lambda: LoRAPruneConfig(cooldown=1.0), "cooldown must be in"),
    (lambda: LoRAPruneConfig(lam=1.0), "lam must be in"),
    (lambda: config_from_dict({"method": "magnitude", "steps": 3}), "MagnitudeConfig has no option steps"),
    (lambda: config_from_dict({"method": "obd"}), "unknown method"),
    (lambda: make_config("obd"), "unknown criterion"),
])
def test_configs_validate_themselves(build, needle):
    with pytest.raises(ValueError, match=needle):
        build()


def test_every_config_is_a_selection_with_options_of_its_own():
    assert set(CONFIGS) == {"magnitude", "random", "taylor", "activation", "flap", "lora"}
    config = make_config("taylor", ratio=0.4, steps=10, lr=1.0, checkpointing=True)  # steps, lr: not Taylor's
    assert isinstance(config, TaylorConfig) and config.checkpointing and config.ratio == 0.4
    assert config.selection() == SelectConfig(ratio=0.4)
    assert LoRAPruneConfig(steps=400).update_every == 10  # masks updated 40 times by default


def test_a_selection_alone_is_not_a_method():
    with pytest.raises(TypeError, match="config must be a PruneConfig"):
        prune(tiny_llama(), token_ids(), SelectConfig(ratio=0.5))


@pytest.mark.parametrize("config", [TaylorConfig(), LoRAPruneConfig(steps=2), LoRAPruneConfig(steps=0)])
def test_gradient_methods_without_data_say_so(config):
    with pytest.raises(ValueError, match="batches"):
        prune(tiny_llama(), token_ids(), config)


# ----------------------------------------------------------------------------------------------- the verb

def test_the_report_is_typed_and_serialisable(tmp_path):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, token_ids(), TaylorConfig(ratio=0.5, exclude_first=0, exclude_last=False),
                   batches=[token_ids(2, 16, seed=1)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is untouched
    report = result.report
    assert isinstance(report, loraprune.PruneReport) and report.criterion == "taylor"
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert report.groups_pruned == {"attention": 2, "mlp": 2} and report.verify["ok"]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["params_removed_fraction"] == pytest.approx(report.params_removed_fraction)
    # the report records the options the prune applied: those left None resolved for a token-id model
    assert config_from_dict(data["config"]) == TaylorConfig(ratio=0.5, exclude_first=0, exclude_last=False,
                                                            prune_hidden=False)
    assert result.plan.meta["config"] == data["config"]
    # the result knows the dense config: saving needs nothing else
    out = loraprune.save_pretrained(result, tmp_path / "m")
    reloaded = loraprune.load_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(token_ids()).logits, result.model(token_ids()).logits)


def test_selection_defaults_follow_the_inputs_and_explicit_options_win():
    """Token ids in: a language model keeps its residual stream and end layers whole. Images in: every group is
    pruned, the residual stream included, no layer kept whole (what Torch-Pruning does for vision models)."""
    language = prune(tiny_llama(), token_ids(), MagnitudeConfig(ratio=0.5, count_macs=False)).report
    assert {k: language.config[k] for k in ("prune_hidden", "exclude_first", "exclude_last")} == \
        {"prune_hidden": False, "exclude_first": 0.1, "exclude_last": True}
    assert "hidden" not in language.groups_pruned and language.verify["exact"]
    normed = prune(tiny_llama(), token_ids(), MagnitudeConfig(ratio=0.5, prune_hidden=True, count_macs=False)).report
    assert normed.groups_pruned["hidden"] == 1 and not normed.verify["exact"]  # RMSNorm over the hidden stream
    images = torch.randn(2, 3, 8, 8)
    vision = prune(tiny_cnn(), images, MagnitudeConfig(ratio=0.5, count_macs=False)).report
    assert {k: vision.config[k] for k in ("prune_hidden", "exclude_first", "exclude_last")} == \
        {"prune_hidden": True, "exclude_first": 0.0, "exclude_last": False}
    assert vision.groups_pruned == {"channel": 3, "hidden": 1}
    assert vision.verify["exact"] and vision.verify["ok"]  # BatchNorm is per channel: still checked exactly
    kept = prune(tiny_cnn(), images, MagnitudeConfig(ratio=0.5, prune_hidden=False, count_macs=False)).report
    assert "hidden" not in kept.groups_pruned and kept.params_after > vision.params_after


class ReadsHiddenWidth(torch.nn.Module):
    """Reshapes an inner tensor by the width it reads off the hidden stream (as torchvision's MaxViT attention
    does): with the hidden stream pruned and the inner width frozen (flip has no rule) the sizes part ways."""

    def __init__(self):
        super().__init__()
        self.embed, self.inner, self.out = torch.nn.Linear(6, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        b, n, d = h.shape
        y = torch.flip(self.inner(h), dims=[-1]).reshape(b * n, d)
        return self.head(h + self.out(y).reshape(b, n, d))


def test_a_hidden_stream_that_breaks_the_compact_model_is_kept_whole_unless_asked_for():
    """Pruned by default (images in), the hidden stream goes back to whole and the report says why; asked for
    explicitly, the prune stops with a line saying how to keep it."""
    x = torch.randn(2, 5, 6)
    report = prune(ReadsHiddenWidth(), x, MagnitudeConfig(ratio=0.3, count_macs=False)).report
    assert report.config["prune_hidden"] is False and report.verify["ok"] and report.verify["exact"]
    (note,) = report.notes
    assert note.startswith("hidden stream kept whole: the compact model did not run with it pruned (shape '[")
    with pytest.raises(RuntimeError, match="does not run .*prune_hidden=False keeps it whole"):
        prune(ReadsHiddenWidth(), x, MagnitudeConfig(ratio=0.3, prune_hidden=True, count_macs=False))


def test_the_one_verb_runs_loraprune_as_its_building_blocks_do():
    """`prune(model, x, LoRAPruneConfig(...))` is the LoRAPrune driver the package had before the one verb
    (`passes.lora_importance.lora_prune`), spelled here from its building blocks: add_lora, analyse the PEFT
    model, iterative_prune, make_plan + apply_plan, merge, plain names. Same plan, same perplexity."""
    from loraprune.evaluate import perplexity
    from loraprune.lora.adapters import add_lora, plain_plan
    from loraprune.passes.dependency import analyze
    from loraprune.passes.rewrite import apply_plan, make_plan
    from loraprune.passes.schedule import iterative_prune

    model = tiny_llama(layers=3, heads=8, kv_heads=4)
    batches = [token_ids(2, 16, seed=s) for s in range(4)]
    held_out = token_ids(4, 24, seed=9)
    select = SelectConfig(ratio=0.5, exclude_first=0, exclude_last=False)
    knobs = dict(steps=12, lr=1e-3, update_every=3, cooldown=0.25, lam=0.9, seed=3, batch_size=4)
    config = LoRAPruneConfig(**select.to_dict(), **knobs, r=4, alpha=8, init="pissa", progress=False)
    result = prune(model, token_ids(), config, batches=batches)

    peft_model = add_lora(copy.deepcopy(model), r=4, alpha=8, seed=3, init="pissa")
    analysis = analyze(peft_model, token_ids())
    kept, _ = iterative_prune(peft_model, analysis, batches, ratio=0.5, config=select, progress=False, **knobs)
    plan = make_plan(analysis.groups, kept, analysis.param_shapes, analysis.program.aliases)
    by_hand = apply_plan(peft_model, plan, inplace=True).merge_and_unload()

    expected = plain_plan(plan).to_dict()
    got = result.plan.to_dict()
    assert {k: got[k] for k in ("kept", "shapes", "attention", "sizes")} == \
           {k: expected[k] for k in ("kept", "shapes", "attention", "sizes")}
    ppl = perplexity(result.model, held_out, progress=False).ppl
    assert ppl == pytest.approx(perplexity(by_hand, held_out, progress=False).ppl, rel=1e-6)


# ----------------------------------------------------------------------------------------------- the package

def _package_imports() -> nx.DiGraph:
    """module -> loraprune module it imports, at any depth of the file (a lazy import is still an import)."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return graph


def test_no_module_imports_another_in_a_cycle():
    graph = _package_imports()
    assert graph.number_of_edges() > 50  # the walk really saw the package
    assert list(nx.simple_cycles(graph)) == []


def test_passes_never_import_upwards():
    graph = _package_imports()
    upward = {"loraprune", "loraprune.api", "loraprune.config", "loraprune.pipeline", "loraprune.cli"}
    found = [(a, b) for a, b in graph.edges if a.startswith(("loraprune.passes", "loraprune.ir", "loraprune.lora"))
             and b in upward]
    assert found == []


_SIDE_EFFECTS = """
import json, os, importlib, sys
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

def state():
    return {"env": dict(os.environ), "sdpa": id(F.scaled_dot_product_attention),
            "attention": sorted(AttentionInterface._global_mapping),
            "masks": sorted(AttentionMaskInterface._global_mapping)}

before = state()
names = sys.argv[1:]
for name in names:
    importlib.import_module(name)
after = state()
print(json.dumps({"modules": len(names), "changed": [k for k in before if before[k] != after[k]],
                  "env": sorted(set(after["env"].items()) ^ set(before["env"].items()))}))
"""


def test_importing_the_package_changes_no_environment_and_patches_nothing():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_", "TRANSFORMERS_"))}
    modules = sorted(n for n in _package_imports() if n != "loraprune.__main__")  # __main__ runs the CLI
    out = subprocess.run([sys.executable, "-c", _SIDE_EFFECTS, *modules], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found["modules"] == len(list(PACKAGE.rglob("*.py"))) - 1  # every module but __main__
    assert found["changed"] == [] and found["env"] == []


def test_offline_mode_holds_inside_the_block_only(monkeypatch):
    from huggingface_hub import constants

    from loraprune.models.load import offline_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with offline_hub():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False


def test_attention_routing_is_registered_only_while_exporting():
    from transformers import AttentionInterface

    from loraprune.runtime.attention import routed_attention

    model = tiny_llama(layers=1)
    model.set_attn_implementation("sdpa")
    name = "loraprune_routed"
    assert name not in AttentionInterface._global_mapping
    with routed_attention(model, 23):
        assert name in AttentionInterface._global_mapping and model.config._attn_implementation == name
        with torch.no_grad():
            model(token_ids())
    assert name not in AttentionInterface._global_mapping and model.config._attn_implementation == "sdpa"
