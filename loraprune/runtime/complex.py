"""Complex arithmetic as real arithmetic in an exported program, so that the ONNX converter can take it.

torch's ONNX converter has no complex tensors (its ops stop at "No decompositions registered for the
complex-valued input"), yet some models compute in complex numbers: Llama 4's rotary embedding is
``view_as_real(view_as_complex(x) * freqs_cis)``. This pass rewrites such a program into real arithmetic before
the converter sees it. A complex tensor of shape ``S`` is carried as a real tensor of shape ``S + (2,)``, real part
then imaginary part on the last dim: the memory layout ``view_as_real`` gives, so ``view_as_complex`` and
``view_as_real`` become no-ops, a product becomes four real products, and shape ops keep the trailing pair.

Op knowledge is one small rule per ATen op family (:data:`COMPLEX_RULES`), as in ``passes/rules.py``. A complex op
without a rule stops the export with its name: a guessed rule would be a silently wrong graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.fx.node import map_arg

__all__ = ["COMPLEX_RULES", "NoComplexRule", "has_complex", "realify_complex"]

aten = torch.ops.aten


class NoComplexRule(RuntimeError):
    """A complex-valued op that the pass has no real-valued form for; the message names the op and the node."""


ComplexRule = Callable[["_Rewriter", Node], Node | None]
COMPLEX_RULES: dict[Any, ComplexRule] = {}


def complex_rule(*packets: Any) -> Callable[[ComplexRule], ComplexRule]:
    """Register a rule for ATen op packets (``aten.mul`` covers ``mul.Tensor`` and ``mul.Scalar``)."""

    def wrap(fn: ComplexRule) -> ComplexRule:
        for packet in packets:
            COMPLEX_RULES[packet] = fn
        return fn

    return wrap


def _is_complex(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.is_complex()


def has_complex(graph: Graph) -> bool:
    """Whether any value of `graph` is a complex tensor (read from the nodes' recorded example values)."""
    return any(_is_complex(node.meta.get("val")) for node in graph.nodes)


class _Rewriter:
    """State of one rewrite: the real form (a node) of every complex node met so far, and the node being rewritten
    (new nodes take its metadata, so the ONNX graph keeps the module scopes)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.real: dict[Node, Node] = {}
        self.current: Node | None = None
        vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
        self.fake_mode = torch._guards.detect_fake_mode(vals)

    def emit(self, op: Any, *args: Any, **kwargs: Any) -> Node:
        """A new call of `op` before the current node, with its example value computed from its inputs'."""
        node = self.graph.call_function(op, tuple(args), kwargs)
        node.meta = {k: v for k, v in self.current.meta.items() if k not in ("val", "tensor_meta")}
        values = map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.fake_mode if self.fake_mode is not None else torch.no_grad():
            node.meta["val"] = op(*values[0], **values[1])
        return node

    def is_complex(self, arg: object) -> bool:
        return isinstance(arg, Node) and arg in self.real

    def form(self, arg: Node) -> Node:
        """The real form ``[..., 2]`` of a complex node."""
        return self.real[arg]

    def rank(self, arg: Node) -> int:
        """The number of dims of a complex node (its real form has one more)."""
        return arg.meta["val"].dim()

    def parts(self, arg: Node) -> tuple[Node, Node]:
        """Real and imaginary parts of a complex node, each of the complex node's shape."""
        form = self.form(arg)
        return self.emit(aten.select.int, form, -1, 0), self.emit(aten.select.int, form, -1, 1)

    def pack(self, re: Node, im: Node) -> Node:
        return self.emit(aten.stack.default, [re, im], -1)

    def fail(self, node: Node, why: str) -> NoComplexRule:
        return NoComplexRule(f"no real-valued form of {node.target} on complex tensors ({why}) at node {node.name}")


def _dim(dim: int, rank: int) -> int:
    """A dim of a rank-`rank` complex tensor, counted from the front (the real form's trailing pair stays last)."""
    return dim + rank if dim < 0 else dim


def _arg(node: Node, index: int, name: str, default: Any) -> Any:
    """An argument given by position or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def realify_complex(graph: Graph) -> bool:
    """Rewrite every complex value of `graph` (an exported ATen graph with example values) into its real form, in
    place. Returns whether anything changed. Program inputs and outputs must be real; an op on complex tensors
    without a rule raises :class:`NoComplexRule`."""
    if not has_complex(graph):
        return False
    rw = _Rewriter(graph)
    done: list[Node] = []
    for node in list(graph.nodes):
        complex_in = [a for a in node.all_input_nodes if a in rw.real]
        complex_out = _is_complex(node.meta.get("val"))
        if not complex_in and not complex_out:
            continue
        if node.op != "call_function":
            raise NoComplexRule(f"a complex tensor is a program {node.op} ({node.name}): only values computed inside "
                                "the program can be given a real form")
        rule = COMPLEX_RULES.get(getattr(node.target, "overloadpacket", node.target))
        if rule is None:
            raise rw.fail(node, "no rule for this op")
        rw.current = node
        with graph.inserting_before(node):
            out = rule(rw, node)
        if complex_out:
            rw.real[node] = out
        elif out is not None:
            node.replace_all_uses_with(out)
        done.append(node)
    for node in reversed(done):
        graph.erase_node(node)
    graph.lint()
    return True


# ---- conversions between complex and real ------------------------------------------------------------------------

@complex_rule(aten.view_as_complex)
def _view_as_complex(rw: _Rewriter, node: Node) -> Node:
    return node.args[0]  # a real [..., 2] tensor is already the real form


@complex_rule(aten.view_as_real)
def _view_as_real(rw: _Rewriter, node: Node) -> Node:
    return rw.form(node.args[0])


@complex_rule(aten.complex)
def _complex(rw: _Rewriter, node: Node) -> Node:
    re, im = node.args[:2]  # each broadcast to the common shape by adding the other's zeros
    return rw.pack(rw.emit(aten.add.Tensor, re, rw.emit(aten.zeros_like.default, im)),
                   rw.emit(aten.add.Tensor, im, rw.emit(aten.zeros_like.default, re)))


@complex_rule(aten.polar)
def _polar(rw: _Rewriter, node: Node) -> Node:
    magnitude, angle = node.args[:2]
    re = rw.emit(aten.mul.Tensor, magnitude, rw.emit(aten.cos.default, angle))
    im = rw.emit(aten.mul.Tensor, magnitude, rw.emit(aten.sin.default, angle))
    return rw.pack(re, im)


@complex_rule(aten.real)
def _real(rw: _Rewriter, node: Node) -> Node:
    return rw.parts(node.args[0])[0]


@complex_rule(aten.imag)
def _imag(rw: _Rewriter, node: Node) -> Node:
    return rw.parts(node.args[0])[1]


@complex_rule(aten.abs)
def _abs(rw: _Rewriter, node: Node) -> Node:
    form = rw.form(node.args[0])
    return rw.emit(aten.sqrt.default, rw.emit(aten.sum.dim_IntList, rw.emit(aten.mul.Tensor, form, form), [-1]))


@complex_rule(aten.angle)
def _angle(rw: _Rewriter, node: Node) -> Node:
    re, im = rw.parts(node.args[0])
    return rw.emit(aten.atan2.default, im, re)


@complex_rule(aten.conj, aten._conj, aten.conj_physical)
def _conj(rw: _Rewriter, node: Node) -> Node:
    re, im = rw.parts(node.args[0])
    return rw.pack(re, rw.emit(aten.neg.default, im))


@complex_rule(aten._assert_tensor_metadata)
def _drop(rw: _Rewriter, node: Node) -> None:
    return None  # it checks the complex dtype, which the real form no longer has


@complex_rule(aten.to, aten._to_copy)
def _cast(rw: _Rewriter, node: Node) -> Node:
    """``to(dtype=...)`` and ``_to_copy``: a complex dtype becomes its real part's dtype; complex to real keeps the
    real part (as torch does), real to complex pairs the value with zeros."""
    source = node.args[0]
    dtype = node.meta["val"].dtype
    real_dtype = dtype.to_real() if dtype.is_complex else dtype
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if node.target is aten.to.other:
        raise rw.fail(node, "a dtype taken from another tensor")
    if node.target is aten.to.dtype:  # to.dtype(self, dtype, ...)
        args[1] = real_dtype
    elif node.target is aten.to.device:  # to.device(self, device, dtype, ...)
        args[2] = real_dtype
    else:  # to.dtype_layout and _to_copy take it by keyword
        kwargs["dtype"] = real_dtype
    if rw.is_complex(source) and dtype.is_complex:
        args[0] = rw.form(source)
        return rw.emit(node.target, *args, **kwargs)
    if rw.is_complex(source):  # complex -> real
        args[0] = rw.parts(source)[0]
        return rw.emit(node.target, *args, **kwargs)
    value = rw.emit(node.target, *args, **kwargs)  # real -> complex
    return rw.pack(value, rw.emit(aten.zeros_like.default, value))


# ---- arithmetic --------------------------------------------------------------------------------------------------

def _scaled(rw: _Rewriter, form: Node, other: Any, op: Any) -> Node:
    """`form` (a real form) times or over a real operand: a tensor gains a trailing dim to broadcast over the pair."""
    if isinstance(other, Node):
        return rw.emit(op, form, rw.emit(aten.unsqueeze.default, other, -1))
    if isinstance(other, complex):
        raise rw.fail(rw.current, "a complex Python scalar")
    return rw.emit(op, form, other)


@complex_rule(aten.mul)
def _mul(rw: _Rewriter, node: Node) -> Node:
    a, b = node.args[:2]
    if rw.is_complex(a) and rw.is_complex(b):
        (ar, ai), (br, bi) = rw.parts(a), rw.parts(b)
        re = rw.emit(aten.sub.Tensor, rw.emit(aten.mul.Tensor, ar, br), rw.emit(aten.mul.Tensor, ai, bi))
        im = rw.emit(aten.add.Tensor, rw.emit(aten.mul.Tensor, ar, bi), rw.emit(aten.mul.Tensor, ai, br))
        return rw.pack(re, im)
    z, other = (a, b) if rw.is_complex(a) else (b, a)
    return _scaled(rw, rw.form(z), other, aten.mul.Tensor)


@complex_rule(aten.div)
def _div(rw: _Rewriter, node: Node) -> Node:
    a, b = node.args[:2]
    if node.kwargs.get("rounding_mode") is not None:
        raise rw.fail(node, "a rounding mode")
    if not rw.is_complex(b):
        return _scaled(rw, rw.form(a), b, aten.div.Tensor)
    (br, bi) = rw.parts(b)
    norm = rw.emit(aten.add.Tensor, rw.emit(aten.mul.Tensor, br, br), rw.emit(aten.mul.Tensor, bi, bi))
    conj = rw.pack(br, rw.emit(aten.neg.default, bi))
    if rw.is_complex(a):
        (ar, ai) = rw.parts(a)
        re = rw.emit(aten.add.Tensor, rw.emit(aten.mul.Tensor, ar, br), rw.emit(aten.mul.Tensor, ai, bi))
        im = rw.emit(aten.sub.Tensor, rw.emit(aten.mul.Tensor, ai, br), rw.emit(aten.mul.Tensor, ar, bi))
        num = rw.pack(re, im)
    else:  # real / complex = real * conj(b) / |b|^2
        num = _scaled(rw, conj, a, aten.mul.Tensor)
    return rw.emit(aten.div.Tensor, num, rw.emit(aten.unsqueeze.default, norm, -1))


@complex_rule(aten.add, aten.sub)
def _add_sub(rw: _Rewriter, node: Node) -> Node:
    """Both complex: the op on the forms. A real operand shifts the real part only."""
    a, b = node.args[:2]
    alpha = node.kwargs.get("alpha", 1)
    op = aten.add.Tensor if node.target.overloadpacket is aten.add else aten.sub.Tensor
    if rw.is_complex(a) and rw.is_complex(b):
        return rw.emit(op, rw.form(a), rw.form(b), alpha=alpha)
    if rw.is_complex(a):
        re, im = rw.parts(a)
        return rw.pack(rw.emit(op, re, b, alpha=alpha), im)
    re, im = rw.parts(b)  # real (op) complex: the imaginary part is -alpha·im for sub, alpha·im for add
    sign = alpha if op is aten.add.Tensor else -alpha
    return rw.pack(rw.emit(op, a, re, alpha=alpha), rw.emit(aten.mul.Tensor, im, sign))


@complex_rule(aten.neg, aten.clone, aten.contiguous, aten.alias, aten.resolve_conj, aten.resolve_neg,
              aten.lift_fresh_copy, aten.detach)
def _same(rw: _Rewriter, node: Node) -> Node:
    """Ops that act alike on every element (or on none): the same op on the real form."""
    return rw.emit(node.target, rw.form(node.args[0]), *node.args[1:], **node.kwargs)


@complex_rule(aten.zeros_like)
def _zeros_like(rw: _Rewriter, node: Node) -> Node:
    kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}
    source = node.args[0]
    if rw.is_complex(source):
        return rw.emit(aten.zeros_like.default, rw.form(source), **kwargs)
    value = rw.emit(aten.zeros_like.default, source, dtype=node.meta["val"].dtype.to_real(), **kwargs)
    return rw.pack(value, value)


# ---- shape ops: the same op with dims counted from the front and the trailing pair kept ---------------------------

@complex_rule(aten.unsqueeze)
def _unsqueeze(rw: _Rewriter, node: Node) -> Node:
    z, dim = node.args[:2]
    return rw.emit(aten.unsqueeze.default, rw.form(z), _dim(dim, rw.rank(z) + 1))


@complex_rule(aten.squeeze)
def _squeeze(rw: _Rewriter, node: Node) -> Node:
    z = node.args[0]
    rank = rw.rank(z)
    if len(node.args) > 1:
        dims = node.args[1] if isinstance(node.args[1], Sequence) else [node.args[1]]
    else:
        dims = [i for i, size in enumerate(z.meta["val"].shape) if size == 1]
    return rw.emit(aten.squeeze.dims, rw.form(z), [_dim(d, rank) for d in dims])


@complex_rule(aten.slice)
def _slice(rw: _Rewriter, node: Node) -> Node:
    z = node.args[0]
    dim = _dim(_arg(node, 1, "dim", 0), rw.rank(z))
    start, end, step = _arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    return rw.emit(aten.slice.Tensor, rw.form(z), dim, start, end, step)


@complex_rule(aten.select)
def _select(rw: _Rewriter, node: Node) -> Node:
    z, dim, index = node.args[:3]
    return rw.emit(aten.select.int, rw.form(z), _dim(dim, rw.rank(z)), index)


@complex_rule(aten.view, aten.reshape, aten._unsafe_view)
def _reshape(rw: _Rewriter, node: Node) -> Node:
    z, shape = node.args[:2]
    return rw.emit(node.target, rw.form(z), [*shape, 2])


@complex_rule(aten.expand)
def _expand(rw: _Rewriter, node: Node) -> Node:
    z, size = node.args[:2]
    return rw.emit(aten.expand.default, rw.form(z), [*size, 2])


@complex_rule(aten.permute)
def _permute(rw: _Rewriter, node: Node) -> Node:
    z, dims = node.args[:2]
    rank = rw.rank(z)
    return rw.emit(aten.permute.default, rw.form(z), [*(_dim(d, rank) for d in dims), rank])


@complex_rule(aten.transpose)
def _transpose(rw: _Rewriter, node: Node) -> Node:
    z, d0, d1 = node.args[:3]
    rank = rw.rank(z)
    return rw.emit(aten.transpose.int, rw.form(z), _dim(d0, rank), _dim(d1, rank))


@complex_rule(aten.flatten)
def _flatten(rw: _Rewriter, node: Node) -> Node:
    z = node.args[0]
    rank = rw.rank(z)
    start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
    return rw.emit(aten.flatten.using_ints, rw.form(z), _dim(start, rank), _dim(end, rank))


@complex_rule(aten.index)
def _index(rw: _Rewriter, node: Node) -> Node:
    z, indices = node.args[:2]  # indices cover leading dims only, so the trailing pair is untouched
    return rw.emit(aten.index.Tensor, rw.form(z), indices)


def _joined(rw: _Rewriter, node: Node, op: Any, extra_dim: int) -> Node:
    tensors = node.args[0]
    if not all(rw.is_complex(t) for t in tensors):
        raise rw.fail(node, "complex and real tensors mixed")
    dim = _dim(_arg(node, 1, "dim", 0), rw.rank(tensors[0]) + extra_dim)
    return rw.emit(op, [rw.form(t) for t in tensors], dim)


@complex_rule(aten.cat)
def _cat(rw: _Rewriter, node: Node) -> Node:
    return _joined(rw, node, aten.cat.default, 0)


@complex_rule(aten.stack)
def _stack(rw: _Rewriter, node: Node) -> Node:
    return _joined(rw, node, aten.stack.default, 1)
