"""Op knowledge for the dependency pass: one small rule per ATen op family, looked up by op name.

A rule reads the atom arrays of its inputs (see coupling.py), records how the op ties channels together,
and returns the atoms of its output(s). An op with no rule is not guessed at: the dependency pass freezes
every channel it touches and reports it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import Node

from loraprune.passes.coupling import NO_CHANNEL, CouplingState

__all__ = ["FIXED_MODULES", "RULES", "NoRule", "ParamAxes", "RuleContext", "fixed_module", "register"]


class NoRule(Exception):
    """A rule declines a call it cannot read (with the reason); the pass then freezes and reports it."""


@dataclass(frozen=True)
class ParamAxes:
    """Atoms of a weight with two or more dims: one independent channel space per dim (rows, columns...)."""

    axes: tuple[np.ndarray, ...]


Atoms = np.ndarray | ParamAxes | None | list
Rule = Callable[["RuleContext", Node], Atoms]
RULES: dict[str, Rule] = {}

# Modules (by qualified class name, as torch.export records them in a node's nn_module_stack) whose code fixes
# widths that the op rules inside them would let shrink: their ops are not read, every channel they touch is
# frozen, and the module is reported once with the reason.
FIXED_MODULES = {
    "torch.nn.modules.activation.MultiheadAttention":
        "nn.MultiheadAttention computes its heads at embed_dim, the width of its input: heads and width stay whole",
}


def register(*ops: str) -> Callable[[Rule], Rule]:
    """Register a rule for ATen ops given as 'aten::name.overload' (or 'aten::name' for the default)."""

    def wrap(fn: Rule) -> Rule:
        for op in ops:
            if op in RULES:
                raise ValueError(f"duplicate dependency rule for {op}")
            RULES[op] = fn
        return fn

    return wrap


def op_key(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target.name()  # 'aten::add.Tensor'
        return name[: -len(".default")] if name.endswith(".default") else name
    return getattr(target, "__name__", str(target))


def fixed_module(node: Node) -> tuple[str, str, str] | None:
    """(path, class name, reason) of the outermost FIXED_MODULES module that `node` runs inside, if any."""
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        if cls in FIXED_MODULES:
            return path, cls, FIXED_MODULES[cls]
    return None


class RuleContext:
    """What a rule may see: the atoms and static shapes of values, the values of the program's tensor constants,
    and the coupling state to record into."""

    def __init__(self, state: CouplingState, atoms: dict[str, Atoms],
                 constants: dict[str, torch.Tensor] | None = None) -> None:
        self.state = state
        self.atoms = atoms
        self.constants = constants or {}

    def constant(self, arg: object) -> torch.Tensor | None:
        """The value of a tensor constant of the program (followed through copies), None if computed."""
        while isinstance(arg, Node) and arg.op == "call_function" and op_key(arg) in _COPIES:
            arg = arg.args[0]
        return self.constants.get(arg.name) if isinstance(arg, Node) and arg.op == "placeholder" else None

    @staticmethod
    def shape(arg: object) -> tuple[int, ...]:
        val = arg.meta.get("val") if isinstance(arg, Node) else None
        return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()

    def joint(self, arg: object) -> np.ndarray | None:
        """Atoms of a tensor as one array over its elements; None for non-tensors (Python scalars)."""
        if not isinstance(arg, Node):
            return None
        atoms = self.atoms.get(arg.name)
        shape = self.shape(arg)
        if isinstance(atoms, ParamAxes):
            atoms = self.param_as_joint(atoms, shape)
        if atoms is None or isinstance(atoms, list):
            return np.full((1,) * len(shape), NO_CHANNEL, dtype=np.int64) if isinstance(
                arg.meta.get("val"), torch.Tensor) else None
        return atoms

    def param_as_joint(self, axes: ParamAxes, shape: tuple[int, ...]) -> np.ndarray:
        """A weight used like an activation: fine when only one dim has more than one channel."""
        big = [d for d, n in enumerate(shape) if n > 1]
        if len(big) <= 1:
            out = np.full((1,) * len(shape), NO_CHANNEL, dtype=np.int64)
            if big:
                out = np.expand_dims(axes.axes[big[0]], [d for d in range(len(shape)) if d != big[0]])
            return out
        for axis in axes.axes:
            self.state.freeze(axis)
        return self.state.fresh_frozen(len(shape))

    def axis_atoms(self, arg: Node, dim: int) -> np.ndarray:
        """1-D atoms of one dim of a weight or activation, broadcast to the dim's size."""
        atoms = self.atoms.get(arg.name)
        size = self.shape(arg)[dim]
        if isinstance(atoms, ParamAxes):
            return atoms.axes[dim]
        joint = self.joint(arg)
        if joint is None:
            return np.full(size, NO_CHANNEL, dtype=np.int64)
        moved = np.moveaxis(joint, dim, -1).reshape(-1, joint.shape[dim])
        if moved.shape[0] > 1:  # channels of this dim also vary with another dim: not a weight-like axis
            return None  # type: ignore[return-value]
        return np.broadcast_to(moved[0], (size,)).copy()


def _pad(atoms: np.ndarray, ndim: int) -> np.ndarray:
    return atoms.reshape((1,) * (ndim - atoms.ndim) + atoms.shape)


def _is_constant(atoms: np.ndarray) -> bool:
    return bool((atoms < 0).all())


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _arg(node: Node, name: str, default: object = None) -> object:
    """The argument `name` of an ATen call, given by position or by keyword (found in the op's schema): ops of
    one family put it at different positions (`linalg_vector_norm(self, ord, dim, ...)`)."""
    if name in node.kwargs:
        return node.kwargs[name]
    names = [a.name for a in node.target._schema.arguments]
    index = names.index(name) if name in names else len(node.args)
    return node.args[index] if index < len(node.args) else default


# ---------------------------------------------------------------------------------------------------------
# Values that pass channels through unchanged
# ---------------------------------------------------------------------------------------------------------
_COPIES = ("aten::clone", "aten::alias", "aten::lift_fresh_copy", "aten::_to_copy", "aten::contiguous")


@register("aten::clone", "aten::alias", "aten::contiguous", "aten::_to_copy", "aten::to.dtype",
          "aten::to.dtype_layout", "aten::to.device", "aten::dropout", "aten::detach", "aten::lift_fresh_copy",
          "aten::relu", "aten::silu", "aten::gelu", "aten::tanh", "aten::sigmoid", "aten::neg", "aten::exp",
          "aten::log", "aten::sqrt", "aten::rsqrt", "aten::abs", "aten::pow.Tensor_Scalar", "aten::reciprocal",
          "aten::sin", "aten::cos", "aten::erf", "aten::mul.Scalar", "aten::add.Scalar", "aten::sub.Scalar",
          "aten::div.Scalar", "aten::hardtanh", "aten::leaky_relu", "aten::clamp", "aten::softplus",
          "aten::hardswish", "aten::hardsigmoid", "aten::elu", "aten::mish", "aten::type_as", "aten::square",
          "aten::masked_fill.Scalar", "aten::relu6", "aten::gelu_", "aten::relu_", "aten::silu_", "aten::expm1",
          "aten::log1p", "aten::sign", "aten::gt.Scalar", "aten::lt.Scalar", "aten::ge.Scalar", "aten::le.Scalar",
          "aten::eq.Scalar", "aten::ne.Scalar", "aten::clamp_min", "aten::clamp_max", "aten::logical_not")
def aten_pointwise_unary(ctx: RuleContext, node: Node) -> Atoms:
    """Elementwise ops of one tensor: channel i of the output is channel i of the input."""
    return ctx.joint(node.args[0])


# ---------------------------------------------------------------------------------------------------------
# Elementwise ops of several tensors: residual adds, gating (SwiGLU gate * up), norms' weight multiply
# ---------------------------------------------------------------------------------------------------------
def _elementwise(ctx: RuleContext, node: Node, operands: list[object], summed: bool) -> Atoms:
    out_shape = ctx.shape(node)
    nd = len(out_shape)
    constants: list[tuple[int, ...]] = []
    gains: list[np.ndarray] = []
    channels: list[tuple[np.ndarray, tuple[int, ...]]] = []
    for arg in operands:
        atoms = ctx.joint(arg)
        if atoms is None:
            continue
        shape = (1,) * (nd - len(ctx.shape(arg))) + ctx.shape(arg)
        atoms = _pad(atoms, nd)
        if _is_constant(atoms):
            constants.append(shape)
        elif int(np.prod(shape)) == 1 and int(np.prod(out_shape)) > 1:
            gains.append(atoms)  # a scalar weight broadcast over channels: it does not couple them
        else:
            channels.append((atoms, shape))
    if not channels:
        return gains[0] if gains else np.full((1,) * nd, NO_CHANNEL, dtype=np.int64)
    widest = np.broadcast_shapes(*(a.shape for a, _ in channels))
    # a tensor of size 1 along a dim where another operand has channels is broadcast over them (a head_dim
    # norm weight over the heads); atoms of size 1 alone mean unknown channels, which must stay tied
    shared = [any(shape[d] == 1 < widest[d] for d in range(nd)) for _, shape in channels]
    if all(shared):
        shared = [False] * len(channels)
    out = None
    for (atoms, _), broadcast in zip(channels, shared, strict=True):
        if broadcast:
            continue
        if out is None:
            out = atoms
            continue
        ctx.state.equal(out, atoms, summed=summed)
        x, y = np.broadcast_arrays(out, atoms)
        out = np.where(x >= 0, x, y)
    for (atoms, _), broadcast in zip(channels, shared, strict=True):
        if broadcast:
            ctx.state.equal_or_shared(out, atoms, summed=summed)
    for shape in constants:  # a constant that varies along a channel dim (rotary cos/sin): those channels move
        for d in range(nd):  # together, within each index of the other channel dims
            if shape[d] > 1 and out.shape[d] > 1:
                rep = ctx.state.merge_along(out, d)
                out = np.broadcast_to(rep, out.shape).copy()
    for gain in gains:
        ctx.state.depends(out, gain)
    return out


@register("aten::add.Tensor", "aten::sub.Tensor", "aten::add_.Tensor", "aten::sub_.Tensor")
def aten_add_tensor(ctx: RuleContext, node: Node) -> Atoms:
    """self + other: the residual stream; channels summed from different producers are marked residual."""
    return _elementwise(ctx, node, [node.args[0], node.args[1]], summed=True)


@register("aten::mul.Tensor", "aten::div.Tensor", "aten::maximum", "aten::minimum", "aten::pow.Tensor_Tensor",
          "aten::mul_.Tensor", "aten::div_.Tensor", "aten::atan2", "aten::fmod.Tensor", "aten::min.other",
          "aten::max.other", "aten::gt.Tensor", "aten::lt.Tensor", "aten::ge.Tensor", "aten::le.Tensor",
          "aten::eq.Tensor", "aten::ne.Tensor", "aten::logical_and", "aten::logical_or")
def aten_mul_tensor(ctx: RuleContext, node: Node) -> Atoms:
    """self * other: gating (SwiGLU gate * up), norm weights, rotary cos/sin."""
    return _elementwise(ctx, node, [node.args[0], node.args[1]], summed=False)


@register("aten::where.self", "aten::masked_fill.Tensor", "aten::lerp.Scalar", "aten::addcmul")
def aten_where_self(ctx: RuleContext, node: Node) -> Atoms:
    """where(condition, self, other): all tensor operands are aligned elementwise."""
    return _elementwise(ctx, node, list(node.args), summed=False)


# ---------------------------------------------------------------------------------------------------------
# Reductions and normalisation over channels
# ---------------------------------------------------------------------------------------------------------
def _reduce(ctx: RuleContext, atoms: np.ndarray, dims: list[int], keepdim: bool) -> np.ndarray:
    for d in dims:
        if atoms.shape[d] == 1:
            continue  # not a channel dim: nothing is reduced over channels
        if any(s > 1 for i, s in enumerate(atoms.shape) if i != d):
            # per head (QK-norm over head_dim): its channels move as one, so a statistic loses all or none
            atoms = ctx.state.merge_along(atoms, d)
        else:
            ctx.state.mark_reduced(atoms)  # statistics over these channels change when any of them goes
            atoms = np.full(atoms.shape[:d] + (1,) + atoms.shape[d + 1:], NO_CHANNEL, dtype=np.int64)
    if not keepdim and dims:
        atoms = np.squeeze(atoms, axis=tuple(dims))
    return atoms


@register("aten::mean.dim", "aten::sum.dim_IntList", "aten::amax", "aten::amin", "aten::var.correction",
          "aten::std.correction", "aten::var.dim", "aten::std.dim", "aten::logsumexp", "aten::norm.ScalarOpt_dim",
          "aten::linalg_vector_norm")
def aten_mean_dim(ctx: RuleContext, node: Node) -> Atoms:
    """mean(self, dim, keepdim): a statistic over channels (RMSNorm's mean of squares). No dim (or an empty list)
    reduces every dim."""
    atoms = ctx.joint(node.args[0])
    nd = atoms.ndim
    dims = _arg(node, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or range(nd))
    return _reduce(ctx, atoms, sorted(_norm_dim(d, nd) for d in dims), bool(_arg(node, "keepdim", False)))


@register("aten::max.dim", "aten::min.dim")
def aten_max_dim(ctx: RuleContext, node: Node) -> Atoms:
    """max(self, dim, keepdim) -> (values, indices): a statistic like amax; the indices carry no channels."""
    atoms = ctx.joint(node.args[0])
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    values = _reduce(ctx, atoms, [_norm_dim(int(node.args[1]), atoms.ndim)], keepdim)
    return [values, np.full(values.shape, NO_CHANNEL, dtype=np.int64)]


@register("aten::softmax.int", "aten::_softmax", "aten::log_softmax.int", "aten::_log_softmax",
          "aten::cumsum")
def aten_softmax_int(ctx: RuleContext, node: Node) -> Atoms:
    """softmax(self, dim): every output depends on all inputs along dim; over channels, mark them reduced."""
    atoms = ctx.joint(node.args[0])
    d = _norm_dim(int(node.args[1]), atoms.ndim)
    if atoms.shape[d] > 1:
        ctx.state.mark_reduced(atoms)
    return atoms


@register("aten::layer_norm", "aten::rms_norm")
def aten_layer_norm(ctx: RuleContext, node: Node) -> Atoms:
    """layer_norm(input, normalized_shape, weight, bias, eps): weight and bias follow the input's channels."""
    atoms = ctx.joint(node.args[0])
    k = len(node.args[1])
    normed = list(range(atoms.ndim - k, atoms.ndim))
    if any(atoms.shape[d] > 1 for d in range(atoms.ndim - k)):  # per head (QK-norm): each head's channels as one
        for d in normed:
            atoms = np.broadcast_to(ctx.state.merge_along(atoms, d), atoms.shape)
    else:
        ctx.state.mark_reduced(atoms)
    for arg in node.args[2:4] if node.target.__name__.startswith("layer_norm") else node.args[2:3]:
        if isinstance(arg, Node):
            param = _pad(ctx.joint(arg), atoms.ndim)
            if param.shape == atoms.shape:
                ctx.state.equal(atoms, param)
            else:  # one weight for every head
                ctx.state.equal_or_shared(atoms, param)
    return ctx.joint(node.args[0])


@register("aten::_native_batch_norm_legit_no_training", "aten::_native_batch_norm_legit_functional",
          "aten::native_batch_norm", "aten::batch_norm", "aten::_native_batch_norm_legit")
def aten_batch_norm(ctx: RuleContext, node: Node) -> Atoms:
    """batch_norm(input, weight, bias, running_mean, running_var, ...): per-channel (dim 1) parameters."""
    atoms = ctx.joint(node.args[0])
    for arg in node.args[1:5]:
        if isinstance(arg, Node):
            per_channel = np.expand_dims(ctx.joint(arg), [d for d in range(atoms.ndim) if d != 1])
            ctx.state.equal(atoms, per_channel)
    if node.target.__name__ == "batch_norm":
        return atoms
    return [atoms, None, None]


# ---------------------------------------------------------------------------------------------------------
# Ops that move values along positions inside each channel: pooling, resampling, padding, rolling
# ---------------------------------------------------------------------------------------------------------
def _along(ctx: RuleContext, node: Node, dims: Iterable[int]) -> np.ndarray:
    """Atoms of an op that moves values along `dims` only: the channels of the other dims pass through. Along a
    channel dim it would mix neighbouring channels or shift them by a literal amount, so it is declined."""
    atoms = ctx.joint(node.args[0])
    if any(atoms.shape[_norm_dim(d, atoms.ndim)] > 1 for d in dims):
        raise NoRule(f"{op_key(node)} along a dim that carries channels")
    return atoms


def _spatial_dims(node: Node) -> range:
    """The trailing dims a 1d / 2d / 3d pooling or resampling op works over (before them: channels, batch)."""
    k = int(re.search(r"([123])d", op_key(node)).group(1))
    return range(-k, 0)


@register("aten::avg_pool1d", "aten::avg_pool2d", "aten::avg_pool3d", "aten::max_pool1d", "aten::max_pool2d",
          "aten::max_pool3d", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d", "aten::adaptive_avg_pool3d",
          "aten::_adaptive_avg_pool2d", "aten::_adaptive_avg_pool3d", "aten::upsample_nearest1d.vec",
          "aten::upsample_nearest2d.vec", "aten::upsample_nearest3d.vec", "aten::upsample_bilinear2d.vec",
          "aten::upsample_nearest2d", "aten::upsample_bilinear2d")
def aten_avg_pool2d(ctx: RuleContext, node: Node) -> Atoms:
    """avg_pool2d(self[N, C, H, W], kernel_size, ...): each channel pooled (or resampled) over its own H, W."""
    return _along(ctx, node, _spatial_dims(node))


@register("aten::max_pool1d_with_indices", "aten::max_pool2d_with_indices", "aten::max_pool3d_with_indices",
          "aten::adaptive_max_pool1d", "aten::adaptive_max_pool2d", "aten::adaptive_max_pool3d")
def aten_max_pool2d_with_indices(ctx: RuleContext, node: Node) -> Atoms:
    """max_pool2d_with_indices(self[N, C, H, W], ...) -> (values, indices): both per channel."""
    atoms = _along(ctx, node, _spatial_dims(node))
    return [atoms, atoms]


@register("aten::pad", "aten::constant_pad_nd", "aten::reflection_pad1d", "aten::reflection_pad2d",
          "aten::reflection_pad3d", "aten::replication_pad1d", "aten::replication_pad2d", "aten::replication_pad3d",
          "aten::_pad_circular")
def aten_pad(ctx: RuleContext, node: Node) -> Atoms:
    """pad(self, pad[2k], mode, value): pad[2i], pad[2i+1] pad the i-th dim from the end; dims padded by 0 are
    untouched."""
    pad = node.args[1]
    return _along(ctx, node, [-1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]])


@register("aten::roll")
def aten_roll(ctx: RuleContext, node: Node) -> Atoms:
    """roll(self, shifts, dims): a cyclic shift along dims (Swin's shifted windows); no dims rolls the flattened
    tensor, which moves values across every dim."""
    return _along(ctx, node, _arg(node, "dims") or range(len(ctx.shape(node))))


# ---------------------------------------------------------------------------------------------------------
# Contractions: linear, matmul, conv. Producer rows <-> consumer columns.
# ---------------------------------------------------------------------------------------------------------
def _contract(ctx: RuleContext, a: np.ndarray, b: np.ndarray, size: int) -> None:
    """Tie the contracted channels of two operands; a side without channels freezes the other side."""
    a = np.broadcast_to(a, (size,)) if a.size == 1 else a
    b = np.broadcast_to(b, (size,)) if b.size == 1 else b
    ctx.state.equal(a, b)


@register("aten::linear")
def aten_linear(ctx: RuleContext, node: Node) -> Atoms:
    """linear(input, weight[out, in], bias[out]): input channels = weight columns; output = weight rows."""
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    return _matmul_weight(ctx, node, x, ctx.axis_atoms(weight, 1), ctx.axis_atoms(weight, 0), bias)


def _matmul_weight(ctx: RuleContext, node: Node, x: Node, w_in: np.ndarray, w_out: np.ndarray,
                   bias: object) -> Atoms:
    xa = ctx.joint(x)
    k = ctx.shape(x)[-1]
    x_in = np.moveaxis(xa, -1, 0).reshape(xa.shape[-1], -1)
    if x_in.shape[1] == 1:
        _contract(ctx, x_in[:, 0], w_in, k)
    else:  # input channels vary with batch-like dims too (unusual): tie each slice
        for col in x_in.T:
            _contract(ctx, col, w_in, k)
    if isinstance(bias, Node):
        ctx.state.equal(w_out, ctx.joint(bias))
    nd = len(ctx.shape(node))
    return w_out.reshape((1,) * (nd - 1) + (-1,))


@register("aten::addmm")
def aten_addmm(ctx: RuleContext, node: Node) -> Atoms:
    """addmm(bias, input, mat2[in, out]): HF Conv1D (GPT-2) keeps weights as [in, out]."""
    bias, x, mat2 = node.args[0], node.args[1], node.args[2]
    if _is_weight(ctx, mat2):
        return _matmul_weight(ctx, node, x, ctx.axis_atoms(mat2, 0), ctx.axis_atoms(mat2, 1), bias)
    out = _matmul(ctx, node, x, mat2)
    return _elementwise_with(ctx, node, out, bias)


@register("aten::baddbmm")
def aten_baddbmm(ctx: RuleContext, node: Node) -> Atoms:
    """baddbmm(input, batch1, batch2): a batched product plus input. Bloom adds its ALiBi bias to the scores:
    a computed constant that differs per head cannot be sliced with the heads, so they stay."""
    out = _matmul(ctx, node, node.args[1], node.args[2])
    bias, shape = ctx.joint(node.args[0]), ctx.shape(node.args[0])
    if bias is not None and _is_constant(bias):
        shape = (1,) * (out.ndim - len(shape)) + shape
        if any(shape[d] > 1 and out.shape[d] > 1 for d in range(out.ndim)):
            ctx.state.freeze(out)
    return _elementwise_with(ctx, node, out, node.args[0])


def _elementwise_with(ctx: RuleContext, node: Node, out: np.ndarray, other: object) -> np.ndarray:
    other_atoms = ctx.joint(other)
    if other_atoms is not None and not _is_constant(other_atoms):
        ctx.state.equal(out, _pad(other_atoms, out.ndim))
    return out


def _is_weight(ctx: RuleContext, arg: object) -> bool:
    return isinstance(arg, Node) and isinstance(ctx.atoms.get(arg.name), ParamAxes)


@register("aten::matmul", "aten::mm", "aten::bmm")
def aten_matmul(ctx: RuleContext, node: Node) -> Atoms:
    """matmul(self[..., m, k], other[..., k, n]): contraction over k, batch dims elementwise."""
    a, b = node.args[0], node.args[1]
    if _is_weight(ctx, b) and len(ctx.shape(b)) == 2:
        return _matmul_weight(ctx, node, a, ctx.axis_atoms(b, 0), ctx.axis_atoms(b, 1), None)
    return _matmul(ctx, node, a, b)


def _matmul(ctx: RuleContext, node: Node, a: Node, b: Node) -> np.ndarray:
    sa, sb = ctx.shape(a), ctx.shape(b)
    if len(sa) < 2 or len(sb) < 2:
        raise NoRule("matmul with a 1-D operand")
    nd = len(ctx.shape(node))
    sa, sb = (1,) * (nd - len(sa)) + sa, (1,) * (nd - len(sb)) + sb
    xa, xb = _pad(ctx.joint(a), nd), _pad(ctx.joint(b), nd)
    # a batch dim of size 1 against channels of the other operand (heads) is broadcast like repeat_kv
    # (multi-query K and V): copies that depend on their source, not ties to it
    def against(size: tuple[int, ...], other: np.ndarray) -> tuple[int, ...]:
        return tuple(other.shape[d] if d < nd - 2 and size[d] == 1 else size[d] for d in range(nd))

    xa, xb = _broadcast_copies(ctx, xa, sa, against(sa, xb)), _broadcast_copies(ctx, xb, sb, against(sb, xa))
    ka, kb = xa, np.swapaxes(xb, -1, -2)  # both [..., *, k]
    k = sa[-1]
    ka_full = np.broadcast_to(ka, ka.shape[:-1] + (k,)) if ka.shape[-1] == 1 else ka
    kb_full = np.broadcast_to(kb, kb.shape[:-1] + (k,)) if kb.shape[-1] == 1 else kb
    if not (_is_constant(ka_full) and _is_constant(kb_full)):
        if ka.shape[-1] > 1 or kb.shape[-1] > 1:
            ctx.state.equal(ka_full[..., :1, :], kb_full[..., :1, :])
    batch_varies = any(s > 1 for s in xa.shape[:-2]) or any(s > 1 for s in xb.shape[:-2])
    # The output of a batched product indexes the batch dims' channels (attention heads): every contracted
    # channel of one batch index moves with it.
    pa = ctx.state.merge_head(xa, nd - 1) if batch_varies else xa[..., :1]
    pb = ctx.state.merge_head(xb, nd - 2) if batch_varies else xb[..., :1, :]
    if batch_varies and not (_is_constant(xa) or _is_constant(xb)):
        ctx.state.mark_head(pa)
        ctx.state.mark_head(pb)
    parts = [p for p in (pa, pb) if not _is_constant(p)]
    if not parts:
        return np.full((1,) * nd, NO_CHANNEL, dtype=np.int64)
    out = parts[0]
    for other in parts[1:]:
        ctx.state.equal(out, other)
        x, y = np.broadcast_arrays(out, other)
        out = np.where(x >= 0, x, y)
    return out


@register("aten::convolution", "aten::conv2d", "aten::conv1d", "aten::conv3d", "aten::_convolution")
def aten_convolution(ctx: RuleContext, node: Node) -> Atoms:
    """convolution(input, weight[out, in/groups, ...], bias, ..., groups): channels on dim 1; with groups > 1
    (depthwise among them) a whole group of input and output channels moves as one.

    conv1d/2d/3d(input, weight, bias, stride, padding, dilation, groups) carry groups at index 6;
    convolution/_convolution(..., transposed, output_padding, groups, ...) at index 8. A transposed
    convolution stores its weight as [in, out/groups]: no rule for it yet, so it is frozen and reported.
    """
    args = node.args
    name = node.target.__name__
    if name.startswith(("convolution", "_convolution")) and args[6]:
        raise NoRule("transposed convolution: its weight is [in, out/groups]")
    groups_at = 8 if name.startswith(("convolution", "_convolution")) else 6
    groups = int(args[groups_at]) if len(args) > groups_at else 1
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    nd = len(ctx.shape(node))
    w_out, w_in = ctx.axis_atoms(weight, 0), ctx.axis_atoms(weight, 1)
    x_in = ctx.axis_atoms(x, 1)
    if x_in is None:
        raise NoRule("input channels vary with other dims")
    for kernel_dim in range(2, len(ctx.shape(weight))):
        ctx.state.freeze(ctx.axis_atoms(weight, kernel_dim))
    if groups == 1:
        _contract(ctx, x_in, w_in, ctx.shape(x)[1])
    else:  # group g maps its input channels to its output channels alone: each group is one unit, kept or removed
        ctx.state.equal(ctx.state.merge_along(x_in.reshape(groups, -1), 1),
                        ctx.state.merge_along(w_out.reshape(groups, -1), 1))
        ctx.state.freeze(w_in)  # a weight column is the same input position inside every group
    if isinstance(bias, Node):
        ctx.state.equal(w_out, ctx.joint(bias))
    return np.expand_dims(w_out, [d for d in range(nd) if d != 1])


@register("aten::embedding")
def aten_embedding(ctx: RuleContext, node: Node) -> Atoms:
    """embedding(weight[num, dim], indices): rows are picked by data, so they are frozen; columns flow on."""
    weight = node.args[0]
    ctx.state.freeze(ctx.axis_atoms(weight, 0))
    nd = len(ctx.shape(node))
    return ctx.axis_atoms(weight, 1).reshape((1,) * (nd - 1) + (-1,))


@register("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention")
def aten_scaled_dot_product_attention(ctx: RuleContext, node: Node) -> Atoms:
    """sdpa(query[.., H, L, E], key[.., Hk, S, E], value[.., Hk, S, Ev], ..., enable_gqa): per head.

    A whole head moves as one (head_dim channels together). With enable_gqa (Hk < H) each KV head is
    broadcast to H/Hk query heads inside the op: the query heads depend on their KV head, as after repeat_kv.
    """
    q, k, v = (ctx.joint(a) for a in node.args[:3])
    nd = len(ctx.shape(node.args[0]))
    q, k, v = (_pad(x, nd) for x in (q, k, v))
    if any(_is_constant(x) for x in (q, k, v)):
        for x in (q, k, v):
            ctx.state.freeze(x)
        out = ctx.state.fresh_frozen(nd)
        return out if "flash" not in node.target.__name__ and "efficient" not in node.target.__name__ else [out]
    q_rep, k_rep, v_rep = (ctx.state.merge_head(x, nd - 1) for x in (q, k, v))
    hq, hk = ctx.shape(node.args[0])[-3], ctx.shape(node.args[1])[-3]
    if hk != hq and hk > 0 and hq % hk == 0:
        shape = q_rep.shape[:-3] + (hq, 1, 1)
        k_rep = ctx.state.copies(np.repeat(np.broadcast_to(k_rep, k_rep.shape[:-3] + (hk, 1, 1)), hq // hk,
                                           axis=-3), shape)
        v_rep = ctx.state.copies(np.repeat(np.broadcast_to(v_rep, v_rep.shape[:-3] + (hk, 1, 1)), hq // hk,
                                           axis=-3), shape)
    for rep in (q_rep, k_rep, v_rep):
        ctx.state.mark_head(rep)
    ctx.state.equal(q_rep, k_rep)
    ctx.state.equal(q_rep, v_rep)
    if "flash" in node.target.__name__ or "efficient" in node.target.__name__:
        return [q_rep, None, None, None]
    return q_rep


# ---------------------------------------------------------------------------------------------------------
# Shape ops: channels move with their data
# ---------------------------------------------------------------------------------------------------------
def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of source dims with runs of target dims of equal product (size-1 dims excluded)."""
    groups = []
    i = j = 0
    s_idx = [d for d, n in enumerate(src) if n != 1]
    t_idx = [d for d, n in enumerate(dst) if n != 1]
    while i < len(s_idx) or j < len(t_idx):
        gi, gj = [], []
        ps = pt = 1
        while True:
            if ps <= pt and i < len(s_idx):
                gi.append(s_idx[i])
                ps *= src[s_idx[i]]
                i += 1
            elif j < len(t_idx):
                gj.append(t_idx[j])
                pt *= dst[t_idx[j]]
                j += 1
            else:
                return None
            if ps == pt and gi and gj:
                break
        groups.append((gi, gj))
    return groups


@register("aten::view", "aten::reshape", "aten::_unsafe_view", "aten::flatten.using_ints",
          "aten::unflatten.int", "aten::view_copy")
def aten_view(ctx: RuleContext, node: Node) -> Atoms:
    """view(self, size): splitting features into (heads, head_dim) makes the channels head-structured."""
    atoms = ctx.joint(node.args[0])
    src, dst = ctx.shape(node.args[0]), ctx.shape(node)
    if _is_constant(atoms):
        return np.full((1,) * len(dst), NO_CHANNEL, dtype=np.int64)
    groups = _reshape_groups(src, dst)
    if groups is None:
        raise NoRule("reshape that does not split or merge whole dims")
    squeezed = atoms.reshape([atoms.shape[d] for d in range(len(src)) if src[d] != 1])
    varies = [any(atoms.shape[d] > 1 for d in gi) for gi, _ in groups]
    bshape = [src[d] if varies[gnum] else 1 for gnum, (gi, _) in enumerate(groups) for d in gi]
    full = np.broadcast_to(squeezed, bshape) if squeezed.ndim else squeezed
    new_shape = []
    for gnum, (_, gj) in enumerate(groups):
        new_shape += [dst[d] for d in gj] if varies[gnum] else [1] * len(gj)
    out = full.reshape(new_shape)
    start = 0
    for gnum, (gi, gj) in enumerate(groups):
        if varies[gnum] and len(gi) == 1 and len(gj) > 1:  # one channel dim viewed as several: rows of a table
            block = np.moveaxis(out, list(range(start, start + len(gj))), list(range(out.ndim - len(gj), out.ndim)))
            rows = block.reshape(block.shape[:out.ndim - len(gj)] + (dst[gj[0]], -1))
            site = (node.name, op_key(node), f"one channel dim viewed as {rows.shape[-2]} rows of {rows.shape[-1]} "
                    "whose rows each hold channels of several groups (heads inside fixed partitions): the compact "
                    "model would need rows of different lengths, so they stay whole")
            ctx.state.split_rows(rows, site)
        start += len(gj)
    for axis in range(out.ndim):  # a dim whose atoms repeat along it carries no channels of its own
        if out.shape[axis] > 1 and (out == np.take(out, [0], axis=axis)).all():
            out = np.take(out, [0], axis=axis)
    t_idx = [d for d, n in enumerate(dst) if n != 1]
    return out.reshape([out.shape[t_idx.index(d)] if d in t_idx else 1 for d in range(len(dst))])


@register("aten::transpose.int", "aten::t", "aten::permute", "aten::numpy_T")
def aten_transpose_int(ctx: RuleContext, node: Node) -> Atoms:
    """transpose / permute: channels follow their dims (also the rows and columns of a weight)."""
    src = node.args[0]
    nd = len(ctx.shape(src))
    if node.target.__name__.startswith("permute"):
        perm = [_norm_dim(d, nd) for d in node.args[1]]
    elif node.target.__name__.startswith("transpose"):
        d0, d1 = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        perm = list(reversed(range(nd)))
    atoms = ctx.atoms.get(src.name)
    if isinstance(atoms, ParamAxes):
        return ParamAxes(tuple(atoms.axes[p] for p in perm))
    return np.transpose(ctx.joint(src), perm)


@register("aten::unsqueeze")
def aten_unsqueeze(ctx: RuleContext, node: Node) -> Atoms:
    atoms = ctx.joint(node.args[0])
    return np.expand_dims(atoms, _norm_dim(node.args[1], atoms.ndim + 1))


@register("aten::squeeze.dim", "aten::squeeze.dims", "aten::squeeze")
def aten_squeeze(ctx: RuleContext, node: Node) -> Atoms:
    atoms = ctx.joint(node.args[0])
    shape = ctx.shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else [d for d, n in enumerate(shape) if n == 1]
    dims = [dims] if isinstance(dims, int) else dims
    dims = tuple(d for d in (_norm_dim(d, atoms.ndim) for d in dims) if shape[d] == 1)
    return np.squeeze(atoms, axis=dims) if dims else atoms


@register("aten::expand", "aten::expand_copy")
def aten_expand(ctx: RuleContext, node: Node) -> Atoms:
    """expand: a broadcast copy. Copies of channels (repeat_kv under GQA) depend on their source channel."""
    return _broadcast_copies(ctx, ctx.joint(node.args[0]), ctx.shape(node.args[0]), ctx.shape(node))


def _broadcast_copies(ctx: RuleContext, atoms: np.ndarray, src: tuple[int, ...], dst: tuple[int, ...]) -> np.ndarray:
    """Atoms of a tensor of shape `src` broadcast to `dst`: the copies along grown dims depend on their source."""
    atoms = _pad(atoms, len(dst))
    src = (1,) * (len(dst) - len(src)) + src
    grown = [d for d in range(len(dst)) if src[d] == 1 and dst[d] > 1]
    if _is_constant(atoms) or not grown or atoms.size == 1:
        return atoms
    shape = tuple(dst[d] if d in grown else atoms.shape[d] for d in range(len(dst)))
    return ctx.state.copies(atoms, shape)


@register("aten::repeat")
def aten_repeat(ctx: RuleContext, node: Node) -> Atoms:
    """repeat(self, repeats): tiles the tensor; every copy of a channel is that channel (DiffLlama's values)."""
    reps = [int(r) for r in node.args[1]]
    atoms = _pad(ctx.joint(node.args[0]), len(reps))
    return np.tile(atoms, [r if atoms.shape[d] > 1 else 1 for d, r in enumerate(reps)])


@register("aten::slice.Tensor", "aten::narrow", "aten::slice_copy.Tensor")
def aten_slice_tensor(ctx: RuleContext, node: Node) -> Atoms:
    """slice(self, dim, start, end, step): rotary's rotate_half halves of head_dim, fused-QKV parts."""
    atoms = ctx.joint(node.args[0])
    nd = atoms.ndim
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    if atoms.shape[dim] == 1:
        return atoms
    size = ctx.shape(node.args[0])[dim]
    if node.target.__name__.startswith("narrow"):
        start, end, step = int(node.args[2]), int(node.args[2]) + int(node.args[3]), 1
    else:
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
        step = node.args[4] if len(node.args) > 4 else 1
    index = np.arange(size)[slice(start, end, step)]
    return np.take(atoms, index, axis=dim)


@register("aten::slice_scatter")
def aten_slice_scatter(ctx: RuleContext, node: Node) -> Atoms:
    """slice_scatter(self, src, dim, start, end, step): `src` written into a slice of `self` (a buffer filled
    part by part: MLA's key, each head's own part beside the rotary part all heads share). The bounds are
    literal, so the channels along `dim` move as one with the rest of their row."""
    shape = ctx.shape(node)
    nd = len(shape)
    dim = _norm_dim(node.args[2] if len(node.args) > 2 else 0, nd)
    start = node.args[3] if len(node.args) > 3 and node.args[3] is not None else 0
    end = node.args[4] if len(node.args) > 4 and node.args[4] is not None else shape[dim]
    step = node.args[5] if len(node.args) > 5 else 1
    index = np.arange(shape[dim])[slice(start, end, step)]
    base, src = _pad(ctx.joint(node.args[0]), nd), _pad(ctx.joint(node.args[1]), nd)
    other = np.broadcast_shapes(*(x.shape[:dim] + (1,) + x.shape[dim + 1:] for x in (base, src)))
    out = np.broadcast_to(base, other[:dim] + (shape[dim],) + other[dim + 1:]).copy()
    where = [slice(None)] * nd
    where[dim] = index
    out[tuple(where)] = np.broadcast_to(src, other[:dim] + (len(index),) + other[dim + 1:])
    if _is_constant(out):
        return np.full((1,) * nd, NO_CHANNEL, dtype=np.int64)
    ctx.state.merge_along(out, dim)
    return out


@register("aten::copy", "aten::copy_")
def aten_copy(ctx: RuleContext, node: Node) -> Atoms:
    """copy(self, src): the values of `src` in the shape of `self` (broadcast copies where `src` is smaller)."""
    return _broadcast_copies(ctx, ctx.joint(node.args[1]), ctx.shape(node.args[1]), ctx.shape(node))


@register("aten::new_empty", "aten::new_zeros", "aten::new_ones", "aten::new_full", "aten::new_empty_strided",
          "aten::empty_like", "aten::zeros_like", "aten::ones_like", "aten::full_like", "aten::zero",
          "aten::fill.Scalar")
def aten_new_empty(ctx: RuleContext, node: Node) -> Atoms:
    """A new tensor that takes only its dtype, device (or shape) from the input: its values carry no channels.
    Where it meets channels they are frozen, unless they overwrite it (copy, slice_scatter)."""
    return np.full((1,) * len(ctx.shape(node)), NO_CHANNEL, dtype=np.int64)


@register("aten::view_as_complex")
def aten_view_as_complex(ctx: RuleContext, node: Node) -> Atoms:
    """view_as_complex(self[..., n, 2]): each (real, imaginary) pair is one complex channel (Llama 4's rotary)."""
    return np.squeeze(ctx.state.merge_along(ctx.joint(node.args[0]), -1), -1)


@register("aten::view_as_real")
def aten_view_as_real(ctx: RuleContext, node: Node) -> Atoms:
    """view_as_real(self[..., n]) -> [..., n, 2]: both parts of a complex channel are that channel."""
    return ctx.joint(node.args[0])[..., None]


@register("aten::select.int")
def aten_select_int(ctx: RuleContext, node: Node) -> Atoms:
    atoms = ctx.joint(node.args[0])
    dim = _norm_dim(node.args[1], atoms.ndim)
    index = int(node.args[2]) if atoms.shape[dim] > 1 else 0
    return np.take(atoms, index, axis=dim)


@register("aten::index.Tensor")
def aten_index_tensor(ctx: RuleContext, node: Node) -> Atoms:
    """index(self, indices) along one dim: a constant list of positions (Falcon's qkv[..., [-2], :] picks K), or
    any positions along a dim without channels (tokens)."""
    atoms = ctx.joint(node.args[0])
    picks = [(d, i) for d, i in enumerate(node.args[1]) if i is not None]
    if len(picks) != 1:
        raise NoRule("more than one indexed dim")
    dim, index = picks[0]
    positions = ctx.shape(index)
    if atoms.shape[dim] == 1:  # rows picked along a dim without channels (MoE token routing): channels pass
        return atoms.reshape(atoms.shape[:dim] + (1,) * len(positions) + atoms.shape[dim + 1:])
    values = ctx.constant(index)
    if values is None or values.dim() != 1 or values.dtype in (torch.bool, torch.uint8):
        raise NoRule("channels picked by indices computed at run time (only a constant list has a rule)")
    return np.take(atoms, values.cpu().numpy() % ctx.shape(node.args[0])[dim], axis=dim)


@register("aten::split.Tensor", "aten::split_with_sizes", "aten::unbind.int", "aten::chunk",
          "aten::split_with_sizes_copy", "aten::split_copy.Tensor")
def aten_split_tensor(ctx: RuleContext, node: Node) -> Atoms:
    """split(self, split_size, dim): a fused projection (GPT-2 c_attn) split into q, k, v parts."""
    atoms = ctx.joint(node.args[0])
    outs = node.meta["val"]
    nd = atoms.ndim
    name = node.target.__name__
    dim = _norm_dim(node.args[1] if name.startswith("unbind") and len(node.args) > 1 else (
        node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) if not name.startswith("unbind")
        else 0, nd)
    sizes = [o.shape[dim] if not name.startswith("unbind") else 1 for o in outs]
    result, start = [], 0
    for n in sizes:
        part = np.take(atoms, np.arange(start, start + n), axis=dim) if atoms.shape[dim] > 1 else atoms
        result.append(np.squeeze(part, dim) if name.startswith("unbind") else part)
        start += n
    return result


@register("aten::cat")
def aten_cat(ctx: RuleContext, node: Node) -> Atoms:
    """cat(tensors, dim): along a channel dim the channel lists are joined; along other dims aligned."""
    tensors = [t for t in node.args[0] if isinstance(t, Node)]
    nd = len(ctx.shape(node))
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    parts = [_pad(ctx.joint(t), nd) for t in tensors]
    if all(_is_constant(p) for p in parts):
        return np.full((1,) * nd, NO_CHANNEL, dtype=np.int64)
    along_channels = any(p.shape[dim] > 1 for p in parts)
    if not along_channels:  # concatenating positions (sequence, batch): the channels of all parts align
        out = next(p for p in parts if not _is_constant(p))
        for p in parts:
            if not _is_constant(p):
                ctx.state.equal(out, p)
        return out
    sizes = [ctx.shape(t)[dim] for t in tensors]
    full = [np.broadcast_to(p, p.shape[:dim] + (n,) + p.shape[dim + 1:]) for p, n in zip(parts, sizes, strict=True)]
    other = np.broadcast_shapes(*[f.shape[:dim] + (1,) + f.shape[dim + 1:] for f in full])
    full = [np.broadcast_to(f, other[:dim] + (f.shape[dim],) + other[dim + 1:]) for f in full]
    out = np.concatenate(full, axis=dim)
    if (out < 0).any():  # a constant part inside a channel dim: the channels around it cannot be sliced
        ctx.state.freeze(out)
    return out


@register("aten::stack")
def aten_stack(ctx: RuleContext, node: Node) -> Atoms:
    """stack(tensors, dim): a new dim that indexes the parts (interleaved rotary's stack((-x2, x1), -1))."""
    nd = len(ctx.shape(node))
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    parts = [_pad(ctx.joint(t), nd - 1) for t in node.args[0]]
    if all(_is_constant(p) for p in parts):
        return np.full((1,) * nd, NO_CHANNEL, dtype=np.int64)
    other = np.broadcast_shapes(*(p.shape for p in parts))
    out = np.stack([np.broadcast_to(p, other) for p in parts], axis=dim)
    if (out < 0).any():  # a constant part beside channels: they cannot be sliced together
        ctx.state.freeze(out)
    return out


@register("getitem")
def getitem(ctx: RuleContext, node: Node) -> Atoms:
    parent = ctx.atoms.get(node.args[0].name)
    if isinstance(parent, list):
        picked = parent[node.args[1]]
        return picked
    raise NoRule("getitem of a value that is not a tuple of tensors")


@register("aten::_assert_tensor_metadata", "aten::_assert_scalar", "aten::sym_constrain_range_for_size",
          "aten::_assert_async.msg", "aten::sym_size.int")
def aten_assert(ctx: RuleContext, node: Node) -> Atoms:
    """Checks and size queries carry no channels."""
    return None


def _unknown(ctx: RuleContext, node: Node) -> Atoms:
    """No rule: every channel the op touches is frozen, and its output channels are unknown (frozen)."""
    touched = False
    for arg in node.all_input_nodes:
        atoms = ctx.atoms.get(arg.name)
        for part in (atoms.axes if isinstance(atoms, ParamAxes) else atoms if isinstance(atoms, list)
                     else [atoms]):
            if isinstance(part, np.ndarray) and (part >= 0).any():
                ctx.state.freeze(part)
                touched = True
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return [ctx.state.fresh_frozen(v.dim()) if touched and isinstance(v, torch.Tensor) else
                (np.full((1,) * v.dim(), NO_CHANNEL, dtype=np.int64) if isinstance(v, torch.Tensor) else None)
                for v in val]
    if not isinstance(val, torch.Tensor):
        return None
    return ctx.state.fresh_frozen(val.dim()) if touched else np.full((1,) * val.dim(), NO_CHANNEL, np.int64)


unknown_op = _unknown
