"""The dependency pass: propagate channel atoms through the ATen graph and group coupled channels.

Entry point: `analyze(model, example_inputs)` or `build_groups(program)`. Works on meta-device models
(only shapes are read), so the groups of an 8B-parameter model can be computed without its weights.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from loraprune.ir.groups import ChannelGroup, FrozenDim, module_of
from loraprune.ir.trace import TracedProgram, trace
from loraprune.passes.coupling import NO_CHANNEL, CouplingState, Solution
from loraprune.passes.rules import RULES, NoRule, ParamAxes, RuleContext, fixed_module, op_key, unknown_op

__all__ = ["Analysis", "analyze", "build_groups"]

# PEFT's LoRA rank dims are adapter internals, never pruned as channels.
_ADAPTER_RANK_DIMS = (("lora_A", 0), ("lora_B", 1), ("lora_embedding_A", 1), ("lora_embedding_B", 0))


@dataclass
class Analysis:
    """Groups (prunable units), frozen reports and the traced program they were computed on."""

    groups: list[ChannelGroup]
    frozen: list[FrozenDim]
    program: TracedProgram
    param_shapes: dict[str, tuple[int, ...]]
    # parameters with channels that a statistic spans (a norm over all heads' channels, OLMoE's q_norm): they are
    # not frozen by any op, yet kept whole, since removing one would change the statistic for the others
    reduced: tuple[str, ...] = ()

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for g in self.groups:
            counts[g.kind] = counts.get(g.kind, 0) + 1
        return counts

    def nothing_to_prune(self, model_name: str, prune_hidden: bool = False) -> str | None:
        """None when some group can lose units (hidden-stream groups only with `prune_hidden`); otherwise one line
        that says why not, for the error a user sees: which groups `--prune-hidden` would make prunable (or that it
        would not help), the ops that froze channels, and where a statistic over channels keeps them whole."""
        prunable = [g for g in self.groups if g.num_units > 1]
        if any(prune_hidden or g.kind != "hidden" for g in prunable):
            return None
        hidden = [g for g in prunable if g.kind == "hidden"]
        if prune_hidden:
            hint = ""
        elif hidden:
            hint = "; --prune-hidden would make prunable: " + ", ".join(
                f"{g.name} ({g.num_units} channels of {len(g.params)} tensors)" for g in hidden)
        else:
            hint = "; --prune-hidden would not help: the hidden stream is not a prunable group either"
        ops = Counter(f.op for f in self.frozen)
        why = [f"{len(self.frozen)} frozen reports (" + ", ".join(f"{op} x{n}" for op, n in ops.most_common(4))
               + (", ..." if len(ops) > 4 else "") + ")"] if self.frozen else []
        if self.reduced:
            why.append(f"a statistic over channels in {len(self.reduced)} tensors (e.g. {self.reduced[0]}: a norm "
                       "spanning several heads or all MLP channels changes when any of them goes)")
        where = " outside the hidden stream" if hidden and not prune_hidden else ""
        return (f"nothing to prune in {model_name}: the dependency pass found no group of prunable units{where}"
                f"{hint}" + (f"; kept whole by {' and '.join(why)}" if why else ""))


def analyze(model: nn.Module, example_inputs: tuple | torch.Tensor) -> Analysis:
    """Trace `model` and find its coupled channel groups."""
    return build_groups(trace(model, example_inputs))


def _is_rank_dim(name: str, dim: int) -> bool:
    return any(f".{key}." in f".{name}." and dim == d for key, d in _ADAPTER_RANK_DIMS)


def _walk(program: TracedProgram, state: CouplingState):
    """Seed atoms on parameters and model inputs, apply one rule per node, freeze the model boundary."""
    atoms: dict[str, object] = {}
    param_atoms: dict[tuple[str, int], np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    reports: list[tuple[str, str, str, np.ndarray]] = []
    ctx = RuleContext(state, atoms, program.constants)
    # Channels summed from two producers are a residual join, unless both producers are parts of one layer
    # (a PEFT LoRA branch adds onto its base layer's output).
    owners = {name: re.sub(r"\.(base_layer|lora_[A-Za-z_]+\.[^.]+)(?=\.)", "", name).rsplit(".", 1)[0]
              for name in program.param_of_input.values()}
    owner_ids = {owner: i for i, owner in enumerate(dict.fromkeys(owners.values()))}
    param_ids = {name: owner_ids[owners[name]] for name in owners}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            name = program.param_of_input.get(node.name)
            persistent = name is not None and name in program.aliases  # non-persistent buffers are constants
            if persistent and isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() > 0:
                shape = tuple(int(s) for s in val.shape)
                shapes[name] = shape
                axes = tuple(state.fresh((n,), origin=param_ids[name]) for n in shape)
                for d, axis in enumerate(axes):
                    param_atoms[(name, d)] = axis
                    if _is_rank_dim(name, d):
                        state.freeze(axis)
                if not node.users:
                    for axis in axes:
                        state.freeze(axis)
                atoms[node.name] = axes[0] if len(axes) == 1 else ParamAxes(axes)
            elif isinstance(val, torch.Tensor) and node.name in program.user_inputs and val.is_floating_point():
                atoms[node.name] = state.fresh_frozen(val.dim())  # model inputs: their channels are fixed
            elif isinstance(val, torch.Tensor):
                atoms[node.name] = np.full((1,) * val.dim(), NO_CHANNEL, dtype=np.int64)
        elif node.op == "call_function":
            key = op_key(node)
            inputs = [atoms.get(a.name) for a in node.all_input_nodes]
            if all(_no_channels(a) for a in inputs) and key != "getitem":
                atoms[node.name] = unknown_op(ctx, node)  # constants in, constants out
                continue
            fixed = fixed_module(node)
            if fixed is not None:  # reported once per module: the entries of its nodes are merged in build_groups
                reports.append((*fixed, _freeze_unknown(ctx, node, atoms)))
                continue
            rule = RULES.get(key)
            if rule is None:
                reports.append((node.name, key, "no dependency rule for this op", _freeze_unknown(ctx, node, atoms)))
                continue
            try:
                atoms[node.name] = rule(ctx, node)
            except NoRule as declined:  # only a rule that declines freezes channels
                reports.append((node.name, key, str(declined), _freeze_unknown(ctx, node, atoms)))
            except Exception as err:  # a rule that breaks is a bug: it keeps its traceback and says where
                err.add_note(f"raised by the dependency rule for {key} at node {node.name}")
                raise
        elif node.op == "output":
            for arg in node.all_input_nodes:
                value = atoms.get(arg.name)
                parts = value.axes if isinstance(value, ParamAxes) else value if isinstance(value, list) else [value]
                for part in parts:
                    if isinstance(part, np.ndarray):
                        state.freeze(part)  # what the model returns keeps its shape
        else:
            reports.append((node.name, str(node.target), f"unsupported node kind {node.op}",
                            _freeze_unknown(ctx, node, atoms)))
    return param_atoms, shapes, reports


def _freeze_unknown(ctx: RuleContext, node, atoms: dict) -> np.ndarray:
    """Apply the no-rule fallback to `node`; return the atoms it froze, for the report."""
    before = len(ctx.state._frozen)
    atoms[node.name] = unknown_op(ctx, node)
    frozen = ctx.state._frozen[before:]
    return np.concatenate(frozen).astype(np.int64) if frozen else np.zeros(0, np.int64)


def _no_channels(atoms: object) -> bool:
    if atoms is None:
        return True
    if isinstance(atoms, ParamAxes):
        return False
    if isinstance(atoms, list):
        return all(_no_channels(a) for a in atoms)
    return bool((np.asarray(atoms) < 0).all())


def build_groups(program: TracedProgram) -> Analysis:
    state = CouplingState()
    param_atoms, shapes, reports = _walk(program, state)
    sol = state.solve()
    reports += [(*site, atoms) for site, atoms in sol.frozen_splits]
    keys = list(param_atoms)
    roots = [sol.root[param_atoms[k]] for k in keys]
    groups = _assemble(keys, roots, sol, program, shapes)
    merged: dict[tuple[str, str, str], list[np.ndarray]] = {}
    for node, op, reason, touched in reports:
        merged.setdefault((node, op, reason), []).append(touched)
    frozen = []
    for (node, op, reason), parts in merged.items():
        touched = np.concatenate(parts)
        hit = set(sol.root[touched]) if len(touched) else set()
        params = tuple(sorted({k[0] for k, r in zip(keys, roots, strict=True) if hit and hit & set(r.tolist())}))
        frozen.append(FrozenDim(node, op, reason, params))
    held = sol.reduced & ~sol.residual & ~sol.frozen
    reduced = tuple(dict.fromkeys(k[0] for k, r in zip(keys, roots, strict=True) if held[r].any()))
    return Analysis(groups, frozen, program, shapes, reduced)


def _assemble(keys: list[tuple[str, int]], roots: list[np.ndarray], sol: Solution,
              program: TracedProgram, program_shapes: dict[str, tuple[int, ...]]) -> list[ChannelGroup]:
    """Classes with the same members (same params and dims, same channel counts) form one group."""
    rng = np.random.default_rng(0)
    salt = rng.integers(1, 2**62, size=len(keys), dtype=np.int64).astype(np.uint64)
    all_roots = np.concatenate(roots)
    all_member = np.concatenate([np.full(len(r), i) for i, r in enumerate(roots)])
    pair_key, counts = np.unique(all_roots * len(keys) + all_member, return_counts=True)
    pair_root, pair_member = pair_key // len(keys), pair_key % len(keys)
    signature = np.zeros(sol.root.shape[0], dtype=np.uint64)
    np.add.at(signature, pair_root, salt[pair_member] * (counts.astype(np.uint64) + np.uint64(1)))

    parents = {int(c): int(p) for c, p in sol.parent_pairs if sol.head[c]}
    parent_set = set(parents.values())
    blocked = sol.frozen | (sol.reduced & ~sol.residual)
    for c, p in sol.parent_pairs:  # a broadcast parent outside attention is never removed
        if not (sol.head[c] and int(c) in parents):
            blocked[p] = True
    class_roots = np.unique(all_roots)
    ordinary = [r for r in class_roots if not blocked[r] and int(r) not in parent_set]
    by_sig: dict[int, list[int]] = {}
    for r in ordinary:
        by_sig.setdefault(int(signature[r]), []).append(int(r))

    order_of = {name: i for i, name in enumerate(program.param_of_input.values())}
    groups = []
    for units in by_sig.values():
        unit_id = {r: u for u, r in enumerate(units)}
        members = _members(keys, roots, unit_id)
        if len(members) < 2:  # a channel seen by one tensor only has no producer/consumer pair to shrink
            continue
        kind = _kind(units, sol, members, [program_shapes[p] for p, _ in members])
        kv_members, kv_of_unit, num_kv = {}, None, 0
        if kind == "attention" and all(u in parents for u in units):
            kv_roots = sorted({parents[u] for u in units})
            if not any(blocked[k] for k in kv_roots):
                kv_id = {r: i for i, r in enumerate(kv_roots)}
                kv_members = _members(keys, roots, kv_id)
                kv_of_unit = np.array([kv_id[parents[u]] for u in units])
                num_kv = len(kv_roots)
        names = [p for p, _ in members] + [p for p, _ in kv_members]
        unit_size = min(int((ids >= 0).sum()) // len(units) for ids in members.values())
        order = min(order_of.get(p, 0) for p in names)
        name = "hidden" if kind == "hidden" else module_of(names) or "model"
        groups.append(ChannelGroup(name, kind, len(units), unit_size, members, order, None, kv_members, num_kv,
                                   kv_of_unit, reduced=bool(sol.reduced[units].any()),
                                   unit_params=_unit_params(members, program_shapes, len(units)),
                                   kv_unit_params=_unit_params(kv_members, program_shapes, num_kv) if num_kv else None))
    groups.sort(key=lambda g: (g.order, g.kind))
    seen: dict[str, int] = {}
    for g in groups:  # names key the kept units and scores: groups of one module (or of the root) get a suffix
        seen[g.name] = seen.get(g.name, 0) + 1
        if seen[g.name] > 1:
            g.name = f"{g.name}#{seen[g.name]}"
    for kind in {g.kind for g in groups}:
        same = [g for g in groups if g.kind == kind]
        if len(same) > 1:
            for layer, g in enumerate(same):
                g.layer = layer
    return groups


def _unit_params(members: dict[tuple[str, int], np.ndarray], shapes: dict[str, tuple[int, ...]],
                 count: int) -> np.ndarray:
    """Parameters removed with each unit: per member, its indices along the dim times the elements of one slice."""
    out = np.zeros(count, dtype=np.int64)
    for (name, dim), ids in members.items():
        shape = shapes[name]
        out += np.bincount(ids[ids >= 0], minlength=count)[:count] * (int(np.prod(shape)) // shape[dim])
    return out


def _members(keys: list[tuple[str, int]], roots: list[np.ndarray], unit_id: dict[int, int]):
    lookup = np.vectorize(lambda r: unit_id.get(int(r), -1), otypes=[np.int64])
    members = {}
    wanted = np.array(sorted(unit_id), dtype=np.int64)
    for key, r in zip(keys, roots, strict=True):
        if np.isin(r, wanted).any():
            members[key] = lookup(r)
    return members


def _kind(units: list[int], sol: Solution, members: dict, shapes: list[tuple[int, ...]]) -> str:
    if any(sol.head[u] for u in units):
        return "attention"
    if any(sol.residual[u] for u in units):
        return "hidden"
    per_unit = {int((ids >= 0).sum()) // len(units) for ids in members.values()}
    return "mlp" if per_unit == {1} and all(len(shape) <= 2 for shape in shapes) else "channel"
