"""Recovery and criteria beyond the paper: distillation from the dense teacher, forward-only criteria, masks that
switch off, and the out-of-domain evaluation text."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from zoo import tiny_gpt2, tiny_llama, token_ids

from loraprune import ActivationConfig, FlapConfig, LoRAPruneConfig, SelectConfig, analyze, prune
from loraprune.data import LICENSES, load_out_of_domain
from loraprune.lora.adapters import add_lora
from loraprune.lora.distill import (
    Distillation,
    ModelTeacher,
    TopK,
    TopKTeacher,
    distillation_loss,
    topk_distillation_loss,
)
from loraprune.lora.training import lora_recover
from loraprune.passes.criteria import CRITERIA
from loraprune.passes.criteria.activations import bias_shifts
from loraprune.passes.masking import Masker
from loraprune.passes.rewrite import masked_copy
from loraprune.passes.schedule import DenseTeacher, iterative_prune
from loraprune.passes.select import select_units


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("init", ["standard", "pissa"])
def test_the_schedules_teacher_is_the_dense_model_at_every_step(init, monkeypatch):
    model = tiny_llama(layers=3, heads=4, kv_heads=2)
    batches = [token_ids(2, 12, seed=s) for s in range(4)]
    dense = {i: logits(model, b) for i, b in enumerate(batches)}
    peft_model = add_lora(copy.deepcopy(model), seed=0, init=init)
    analysis = analyze(peft_model, token_ids())
    seen, students = [], []
    call = DenseTeacher.__call__

    def recorded(self, batch):
        out = call(self, batch)
        index = next(i for i, b in enumerate(batches) if b is batch)
        seen.append((index, out, self.model.training))
        students.append(logits(copy.deepcopy(self.model), batch))  # the masked student at the same moment
        self.model.train()
        return out

    monkeypatch.setattr(DenseTeacher, "__call__", recorded)
    iterative_prune(peft_model, analysis, batches, ratio=0.5, steps=12, update_every=2, lr=1e-2, cooldown=0.2,
                    progress=False, distill=1.0, config=SelectConfig(exclude_first=0, exclude_last=False))
    assert len(seen) == 12  # one teacher forward per step
    tolerance = 0 if init == "standard" else 1e-4  # PiSSA's residual + factors is W up to rounding
    for index, out, _ in seen:
        assert out.grad_fn is None and not out.requires_grad  # nothing gets a gradient from the teacher
        torch.testing.assert_close(out, dense[index], atol=tolerance, rtol=tolerance)
    # the student it taught was really the pruned model, and the training mode came back after each teacher call
    assert not torch.allclose(students[-1], seen[-1][1], atol=1e-3)
    assert all(training for *_, training in seen)


def test_distillation_from_itself_at_temperature_one_is_zero_loss_and_zero_gradient():
    model = tiny_llama()
    batch = token_ids(2, 10)
    loss = Distillation(ModelTeacher(model), weight=1.0, temperature=1.0).loss(model.train(), batch)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-6
    # and it is the KL of the softened distributions: positive for two different models
    other = tiny_llama()
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.normal_(0, 0.2)
    kl = distillation_loss(logits(other, batch), logits(model, batch), temperature=2.0)
    assert kl.item() > 0


def test_distillation_loss_skips_padded_positions():
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = teacher.clone()
    changed[0, 3:] = 100.0  # only padded positions differ
    assert distillation_loss(student, teacher, mask) == distillation_loss(student, changed, mask)


def test_recovery_by_distillation_moves_the_pruned_model_toward_the_teacher():
    model = tiny_llama()
    batches = [token_ids(2, 16, seed=s) for s in range(4)]
    pruned = prune(model, token_ids(), ActivationConfig(ratio=0.5, exclude_first=0, exclude_last=False),
                   batches=batches).model
    teacher = ModelTeacher(model)
    gap = [distillation_loss(logits(m, batches[0]), teacher(batches[0])).item() for m in (pruned,)]
    recovered, losses = lora_recover(pruned, batches, steps=20, lr=1e-3, progress=False,
                                     loss_fn=Distillation(teacher, weight=1.0, temperature=2.0).loss)
    gap.append(distillation_loss(logits(recovered, batches[0]), teacher(batches[0])).item())
    assert gap[1] < gap[0] and len(losses) == 20
    assert teacher.bytes == sum(p.numel() * 4 for p in model.parameters())


def _topk(logits: torch.Tensor, k: int, temperature: float) -> TopK:
    values, indices = torch.log_softmax(logits / temperature, -1).topk(k, dim=-1)
    return TopK(indices.to(torch.int32), values, temperature)


def test_topk_distillation_is_the_full_kl_at_the_whole_vocabulary_and_zero_on_itself_at_any_k():
    torch.manual_seed(0)
    teacher, start = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    grads = []
    for loss_of in (lambda s: distillation_loss(s, teacher, mask, temperature=2.0),
                    lambda s: topk_distillation_loss(s, _topk(teacher, 11, 2.0), mask)):
        student = start.clone().requires_grad_()
        loss = loss_of(student)
        loss.backward()
        grads.append((loss.detach(), student.grad))
    torch.testing.assert_close(grads[0], grads[1])
    for k in (1, 3):
        student = teacher.clone().requires_grad_()
        loss = topk_distillation_loss(student, _topk(teacher, k, 1.0))
        loss.backward()
        assert abs(loss.item()) < 1e-6 and student.grad.abs().max().item() < 1e-6
        assert topk_distillation_loss(start, _topk(teacher, k, 1.0)).item() > 0.01


def test_topk_teacher_keeps_every_row_it_saw_and_recovery_moves_toward_it():
    model = tiny_llama()
    batches = [token_ids(2, 16, seed=s) for s in range(3)]
    teacher = TopKTeacher(model, batches, k=4, temperature=2.0, progress=False)
    assert teacher.bytes == 3 * 2 * 16 * 4 * 8  # int32 index + float32 log-probability per kept token
    whole = teacher(batches[1])
    torch.testing.assert_close(whole.log_probs, _topk(logits(model, batches[1]), 4, 2.0).log_probs)
    split = teacher(torch.cat([batches[2][1:], batches[1][:1]]))  # rows of two batches, as a data-parallel split
    torch.testing.assert_close(split.log_probs[1], whole.log_probs[0])
    with pytest.raises(KeyError, match="only the batches it was given"):
        teacher(token_ids(2, 16, seed=9))
    with pytest.raises(ValueError, match="top-k teacher needs k >= 1, got 0"):
        TopKTeacher(model, batches, k=0, progress=False)
    with pytest.raises(ValueError, match="computed at temperature 2, the loss is at 1"):
        Distillation(teacher, temperature=1.0).loss(model, batches[0])
    pruned = prune(model, token_ids(), ActivationConfig(ratio=0.5, exclude_first=0, exclude_last=False),
                   batches=batches).model
    before = topk_distillation_loss(logits(pruned, batches[0]), teacher(batches[0])).item()
    recovered, _ = lora_recover(pruned, batches, steps=12, lr=1e-3, progress=False,
                                loss_fn=Distillation(teacher, weight=1.0, temperature=2.0).loss)
    assert topk_distillation_loss(logits(recovered, batches[0]), teacher(batches[0])).item() < before


def test_topk_teacher_keys_a_padded_row_by_its_tokens_and_its_mask():
    """Dict batches with an attention mask: the kept distributions are the dense model's under that mask, and
    the same tokens under another mask (here none) are a row the teacher never saw."""
    model = tiny_llama()
    ids = token_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # the first row left-padded
    batch = {"input_ids": ids, "attention_mask": mask}
    teacher = TopKTeacher(model, [batch], k=4, progress=False)
    model.eval()
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(teacher(batch).log_probs, _topk(dense, 4, 1.0).log_probs)
    with pytest.raises(KeyError, match="only the batches it was given"):
        teacher(ids)


def test_masks_by_hooks_equal_zeroed_weights_and_switch_off_to_the_dense_model():
    model = tiny_llama(layers=2, heads=4, kv_heads=2, tie=True)
    ids = token_ids(2, 9)
    analysis = analyze(model, token_ids())
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.num_units) for g in analysis.groups}
    kept = select_units(analysis.groups, scores, SelectConfig(ratio=0.5, exclude_first=0, exclude_last=False,
                                                              prune_hidden=True))
    reference = logits(masked_copy(model, analysis.groups, kept), ids)
    dense = logits(model, ids)
    work = copy.deepcopy(model).requires_grad_(False)  # frozen, as the base is in the schedule
    masker = Masker(work, analysis.groups)
    masker.set(kept)
    torch.testing.assert_close(logits(work, ids), reference, atol=1e-5, rtol=1e-5)
    stashed = masker.stash_bytes
    weights = sum(p.numel() * p.element_size() for p in work.parameters())
    assert 0 < stashed < 0.01 * weights  # only the norm weights are zeroed in place; matrices keep their values
    with masker.off():
        torch.testing.assert_close(logits(work, ids), dense, atol=0, rtol=0)
    torch.testing.assert_close(logits(work, ids), reference, atol=1e-5, rtol=1e-5)
    masker.finalize()  # in place from here on, and no hook left
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in work.modules())
    torch.testing.assert_close(logits(work, ids), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("criterion", ["activation", "flap"])
def test_forward_only_criteria_never_call_backward_and_rank_a_silent_channel_lowest(criterion, monkeypatch):
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5] = 0.0  # MLP channel 5 of layer 1: act(gate) * 0, always zero
        model.model.layers[0].self_attn.v_proj.weight[16:32] = 0.0  # KV head 1 of layer 0: its heads output zero

    def refuse(*args, **kwargs):
        raise AssertionError("a forward-only criterion called backward")

    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    analysis = analyze(model, token_ids())
    scores = CRITERIA[criterion](model, analysis.groups, batches=[token_ids(2, 16, seed=s) for s in range(3)])
    mlp_group = next(g for g in analysis.groups if g.kind == "mlp" and any("layers.1." in p for p, _ in g.members))
    units = scores.units[mlp_group.name]
    assert np.argmin(units) == 5 and units[5] < 1e-6 * np.median(units)
    attention = next(g for g in analysis.groups if g.kind == "attention" and
                     any("layers.0." in p for p, _ in g.members))
    heads = scores.units[attention.name]
    silent = [u for u in range(attention.num_units) if attention.kv_of_unit[u] == 1]
    assert set(np.argsort(heads)[:len(silent)]) == set(silent)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


class _ConstantChannel(nn.Module):
    """Linear -> ReLU -> Linear with a bias, where hidden channel 3 is a constant 2.0 for every input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(6, 8), nn.Linear(8, 6)
        with torch.no_grad():
            self.up.weight[3] = 0.0
            self.up.bias[3] = 2.0

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_flap_removes_a_constant_channel_first_and_its_bias_compensation_keeps_the_output():
    model = _ConstantChannel()
    x = torch.randn(16, 6)
    result = prune(model, (x[:2],), FlapConfig(ratio=0.125, exclude_first=0, exclude_last=False), batches=[x])
    group = next(g for g in result.groups if g.num_units == 8)
    assert 3 not in result.kept_units[group.name] and len(result.kept_units[group.name]) == 7
    assert result.report.biases_compensated == ["down.bias"]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), atol=1e-5, rtol=1e-5)  # the constant moved into b
    assert torch.equal(model.down.bias, _ConstantChannel().down.bias)  # the input model is not changed


def test_flap_compensates_only_layers_with_a_bias_and_the_compact_model_verifies():
    model = tiny_gpt2()  # Conv1D layers with biases
    batches = [token_ids(2, 16, seed=s) for s in range(2)]
    result = prune(model, token_ids(), FlapConfig(ratio=0.5, exclude_first=0, exclude_last=False), batches=batches)
    assert result.report.verify["ok"] and result.report.biases_compensated
    assert all(name.endswith(".bias") for name in result.report.biases_compensated)
    llama = tiny_llama()  # no biases: FLAP's scores, nothing to compensate
    analysis = analyze(llama, token_ids())
    scores = CRITERIA["flap"](llama, analysis.groups, batches=batches)
    kept = select_units(analysis.groups, scores.units, SelectConfig(ratio=0.5), scores.kv)
    assert scores.input_means and bias_shifts(llama, analysis.groups, kept, scores.input_means) == {}


def test_lora_prune_with_distillation_reports_the_teachers_memory():
    model = tiny_llama()
    config = LoRAPruneConfig(ratio=0.5, steps=6, update_every=2, lr=1e-3, progress=False, distill=0.5,
                             temperature=2.0, exclude_first=0, exclude_last=False, count_macs=False)
    result = prune(model, token_ids(), config, batches=[token_ids(2, 12, seed=s) for s in range(3)])
    assert result.report.verify["ok"]
    # no second model, no copy of a weight matrix: the initial factors (r x (in + out) per adapted layer) only
    factors = sum(8 * (m.in_features + m.out_features) * 4 for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and name != "lm_head")
    assert result.report.teacher_bytes == factors
    with pytest.raises(ValueError, match="distill must be in"):
        LoRAPruneConfig(distill=1.5)


def test_distillation_without_fine_tuning_is_refused_in_one_line(tmp_path, capsys):
    from loraprune.cli import main

    out = tmp_path / "out"
    assert main(["prune", "--criterion", "magnitude", "--distill", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--distill is a fine-tuning loss" in err and len(err.splitlines()) == 1 and not out.exists()


def test_out_of_domain_text_is_the_licences_without_duplicates_or_the_users_files(tmp_path, monkeypatch):
    corpus = load_out_of_domain()
    assert corpus is not None and not corpus.train  # the licence texts ship on every machine this runs on
    assert len(corpus.held_out) == len(set(corpus.held_out)) >= 5
    linked = [p for p in LICENSES.iterdir() if p.is_symlink()]
    assert len(corpus.held_out) <= len([p for p in LICENSES.iterdir() if p.is_file()]) - len(linked)
    monkeypatch.setattr("loraprune.data.LICENSES", tmp_path / "none")
    assert load_out_of_domain() is None  # elsewhere: no second text, and the reports say so
    text = tmp_path / "other.txt"
    text.write_text("Some other text. " * 50)
    mine = load_out_of_domain([text])
    assert mine.held_out == [text.read_text()] and mine.train == []
