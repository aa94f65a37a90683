"""Multiply-accumulates of a traced program, counted from the shapes of its own tensors."""

from __future__ import annotations

import math

import torch
from torch.fx import Graph, Node

from loraprune.passes.rules import op_key

__all__ = ["count_macs"]


def _numel(node: object) -> int:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return int(math.prod(val.shape)) if isinstance(val, torch.Tensor) else 0


def _shape(node: object) -> tuple[int, ...]:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _linear(node: Node) -> int:
    return _numel(node) * _shape(node.args[0])[-1]


def _addmm(node: Node) -> int:
    return _numel(node) * _shape(node.args[1])[-1]


def _matmul(node: Node) -> int:
    return _numel(node) * _shape(node.args[0])[-1]


def _conv(node: Node) -> int:
    weight = _shape(node.args[1])
    return _numel(node) * math.prod(weight[1:])


def _sdpa(node: Node) -> int:
    q, k, v = (_shape(a) for a in node.args[:3])
    scores = math.prod(q[:-1]) * k[-2]
    return scores * q[-1] + scores * v[-1]


MAC_RULES = {
    "aten::linear": _linear,
    "aten::addmm": _addmm,
    "aten::matmul": _matmul,
    "aten::mm": _matmul,
    "aten::bmm": _matmul,
    "aten::convolution": _conv,
    "aten::conv1d": _conv,
    "aten::conv2d": _conv,
    "aten::conv3d": _conv,
    "aten::scaled_dot_product_attention": _sdpa,
}


def count_macs(graph: Graph) -> int:
    return sum(MAC_RULES[op_key(n)](n) for n in graph.nodes if n.op == "call_function" and op_key(n) in MAC_RULES)
