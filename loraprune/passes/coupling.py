"""Channel atoms and the couplings between them, solved at the end by a vectorised union-find.

Every channel of every parameter dim is an *atom* (an int). Each graph value carries an int64 array of
atoms with the value's rank: a dim that carries channels has its full size, any other dim has size 1, and
-1 marks "no channel" (constants, batch and sequence positions). Op rules record three relations:

- equal:   two atoms must be kept or removed together (a linear's input column and the producer's row);
- depends: a child atom exists only while its parent does (a KV head broadcast to the query heads that
           read it under GQA; a scalar gain broadcast over channels);
- frozen:  the atom must never be removed (model inputs/outputs, ops with no rule, data-indexed rows);
- shared:  a tensor broadcast over a channel dim of another (a head_dim norm weight applied to every head):
           tied like `equal` unless it meets several classes, which then share it (decided in `solve`).

Relations are only recorded while walking the graph; `solve` turns them into classes in one go, so the walk
stays linear in the graph size even for 8B-parameter shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["NO_CHANNEL", "CouplingState", "Solution", "connected_components"]

NO_CHANNEL = -1


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest atom id of each atom's component (min-label propagation with pointer jumping)."""
    label = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return label
    while True:
        la, lb = label[a], label[b]
        low = np.minimum(la, lb)
        new = label.copy()
        np.minimum.at(new, la, low)
        np.minimum.at(new, lb, low)
        while True:  # pointer jumping: point every atom at its root's label
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return label
        label = new


@dataclass
class Solution:
    """Classes of atoms once all relations are solved."""

    root: np.ndarray  # class id (smallest atom) of each atom
    frozen: np.ndarray  # bool per class root
    residual: np.ndarray  # bool per class root: channels summed from different producers
    reduced: np.ndarray  # bool per class root: channels reduced over (norm statistics, softmax)
    head: np.ndarray  # bool per class root: channels that index attention heads
    parent_pairs: np.ndarray  # [k, 2] (child root, parent root), unique
    # (site, atoms) of every view into rows that `solve` froze (see `split_rows`), for the frozen report
    frozen_splits: list[tuple[tuple[str, ...], np.ndarray]] = field(default_factory=list)


class CouplingState:
    """Allocates atoms and records relations between them."""

    def __init__(self) -> None:
        self.count = 0
        self.origin: list[np.ndarray] = []  # producing parameter id per atom block, -1 for derived atoms
        self._eq: list[tuple[np.ndarray, np.ndarray]] = []
        self._sum: list[tuple[np.ndarray, np.ndarray]] = []
        self._dep: list[tuple[np.ndarray, np.ndarray]] = []
        self._frozen: list[np.ndarray] = []
        self._reduced: list[np.ndarray] = []
        self._head: list[np.ndarray] = []
        self._shared: list[tuple[np.ndarray, np.ndarray, bool, np.ndarray, np.ndarray]] = []
        self._splits: list[np.ndarray] = []
        self._split_sites: list[tuple[str, ...]] = []
        self._head_blocks: list[np.ndarray] = []

    # -- allocation -------------------------------------------------------------------------------------
    def fresh(self, shape: tuple[int, ...], origin: int = -1) -> np.ndarray:
        n = int(np.prod(shape)) if shape else 1
        atoms = np.arange(self.count, self.count + n, dtype=np.int64).reshape(shape)
        self.count += n
        self.origin.append(np.full(n, origin, dtype=np.int64))
        return atoms

    def fresh_frozen(self, ndim: int) -> np.ndarray:
        """One frozen atom broadcast over a value whose channels nobody understands."""
        atoms = self.fresh((1,) * ndim)
        self.freeze(atoms)
        return atoms

    # -- relations -------------------------------------------------------------------------------------
    @staticmethod
    def _pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = np.broadcast_arrays(a, b)
        a, b = a.ravel(), b.ravel()
        keep = (a >= 0) & (b >= 0)
        return a[keep], b[keep]

    def equal(self, a: np.ndarray, b: np.ndarray, summed: bool = False) -> None:
        """Tie atoms elementwise (numpy broadcasting). Where exactly one side has no channel, the channel
        meets a constant it cannot be sliced with, so it is frozen."""
        x, y = np.broadcast_arrays(a, b)
        lone = (x >= 0) != (y >= 0)
        if lone.any():
            self.freeze(np.where(x >= 0, x, y)[lone])
        pa, pb = self._pairs(a, b)
        self._eq.append((pa, pb))
        if summed:
            self._sum.append((pa, pb))

    def equal_or_shared(self, full: np.ndarray, operand: np.ndarray, summed: bool = False) -> None:
        """`operand` is broadcast over channel dims of `full`. If each of its channels meets one class of
        `full` (a per-head gain over a head's channels), this is `equal`. If one channel meets several classes
        (a head_dim norm weight shared by all heads), those classes share the operand: it is frozen and not
        tied to them, and within each of them the channels along the operand's own dims move as one, so no
        class can ever need a slice of the shared tensor. Classes are known only in `solve`, which decides."""
        x, y = np.broadcast_arrays(full, operand)
        lone = (x >= 0) != (y >= 0)
        if lone.any():
            self.freeze(np.where(x >= 0, x, y)[lone])
        pa, pb = self._pairs(operand, full)
        inside = [d for d in range(full.ndim) if operand.shape[d] > 1 and full.shape[d] > 1]
        merged = [self._merge_pairs(full, d) for d in inside]
        ma = np.concatenate([m[0] for m in merged]) if merged else np.zeros(0, np.int64)
        mb = np.concatenate([m[1] for m in merged]) if merged else np.zeros(0, np.int64)
        self._shared.append((pa, pb, summed, ma, mb))

    def split_rows(self, block: np.ndarray, site: tuple[str, ...] = ()) -> None:
        """`block` [..., rows, row]: one channel dim viewed as (rows, row). The compact model can only shrink
        the rows (the view's leading size: heads) or every row alike (its trailing size: GLU halves); a class
        inside one row that shares it with others (one of several heads in each of CodeGen's 4 model-parallel
        partitions) would need rows of different lengths, so `solve` freezes such a block and names `site`
        (node, op, what the view does) in `Solution.frozen_splits`. One exception: a row that is one KV group (a KV
        head and the query heads that read it, Falcon's fused qkv) shrinks alike, because selection removes the
        same number of query heads from every KV group."""
        self._splits.append(block.reshape(-1, *block.shape[-2:]))
        self._split_sites.append(site)

    @staticmethod
    def _rows_ok(block: np.ndarray, parent: dict[int, int]) -> bool:
        for rows in block:
            sets = [set(row[row >= 0].tolist()) for row in rows]
            everywhere = set.intersection(*sets) if sets else set()
            for row in sets:
                kv_group = not everywhere and any(all(parent.get(c) == p for c in row - {p}) for p in row)
                if len(row) > 1 and row != everywhere and not kv_group:
                    return False
        return True

    def _merge_pairs(self, atoms: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        return self._pairs(atoms, self._representative(atoms, axis))

    @staticmethod
    def _representative(atoms: np.ndarray, axis: int) -> np.ndarray:
        """One atom per row along `axis`: a channel wherever the row has one (positions without are -1)."""
        return np.max(atoms, axis=axis, keepdims=True)

    def merge_along(self, atoms: np.ndarray, axis: int) -> np.ndarray:
        """Channels along `axis` move as one (e.g. head_dim inside a head); returns the representatives."""
        if atoms.shape[axis] == 1:
            return atoms
        self._eq.append(self._merge_pairs(atoms, axis))
        return self._representative(atoms, axis)

    def merge_head(self, atoms: np.ndarray, axis: int) -> np.ndarray:
        """`merge_along` for the channels of attention heads at the attention op (head_dim). The blocks are kept
        so that `solve` can tell a KV head (a query head's key is wholly a copy of it) from a part that every
        head's key shares beside channels of its own (MLA's rotary key), which is no KV head."""
        if atoms.shape[axis] > 1:
            self._head_blocks.append(np.moveaxis(atoms, axis, -1).reshape(-1, atoms.shape[axis]))
        return self.merge_along(atoms, axis)

    def depends(self, child: np.ndarray, parent: np.ndarray) -> None:
        self._dep.append(self._pairs(child, parent))

    def freeze(self, atoms: np.ndarray) -> None:
        atoms = np.asarray(atoms).ravel()
        self._frozen.append(atoms[atoms >= 0])

    def mark_reduced(self, atoms: np.ndarray) -> None:
        atoms = np.asarray(atoms).ravel()
        self._reduced.append(atoms[atoms >= 0])

    def mark_head(self, atoms: np.ndarray) -> None:
        atoms = np.asarray(atoms).ravel()
        self._head.append(atoms[atoms >= 0])

    def copies(self, parent: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Fresh atoms of `shape` that each depend on the parent they were broadcast from."""
        child = self.fresh(shape)
        self.depends(child, np.broadcast_to(parent, shape))
        return child

    # -- solving ---------------------------------------------------------------------------------------
    def _flag(self, parts: list[np.ndarray], root: np.ndarray) -> np.ndarray:
        flag = np.zeros(self.count, dtype=bool)
        if parts:
            flag[root[np.concatenate(parts)]] = True
        return flag

    @staticmethod
    def _dep_pairs(dep: np.ndarray, root: np.ndarray) -> np.ndarray:
        """Distinct (child class, parent class) pairs of the dependencies, a class never its own parent."""
        pairs = np.unique(np.stack([root[dep[:, 0]], root[dep[:, 1]]], 1), axis=0)
        return pairs[pairs[:, 0] != pairs[:, 1]]

    def _shared_parts(self, dep: np.ndarray) -> np.ndarray:
        """Parent atoms copied into a head's channels beside channels the head owns: a part shared by the keys
        of several heads, never removed (frozen in `solve` when it has several child classes), not a KV head."""
        if not self._head_blocks or not len(dep):
            return np.zeros(0, np.int64)
        is_copy = np.zeros(self.count, dtype=bool)
        is_copy[dep[:, 0]] = True
        children = []
        for block in self._head_blocks:
            channel = block >= 0
            copied = is_copy[np.maximum(block, 0)] & channel
            mixed = copied.any(1) & (channel & ~copied).any(1)
            children.append(block[mixed][copied[mixed]])
        return dep[np.isin(dep[:, 0], np.concatenate(children)), 1]

    def solve(self) -> Solution:
        eq_a = np.concatenate([p[0] for p in self._eq]) if self._eq else np.zeros(0, np.int64)
        eq_b = np.concatenate([p[1] for p in self._eq]) if self._eq else np.zeros(0, np.int64)
        dep = np.stack([np.concatenate([p[0] for p in self._dep]), np.concatenate([p[1] for p in self._dep])], 1) \
            if self._dep else np.zeros((0, 2), np.int64)
        root = connected_components(self.count, eq_a, eq_b)
        sums, frozen = list(self._sum), list(self._frozen)
        if self._shared:
            eq_a, eq_b = [eq_a], [eq_b]
            for op, full, summed, ma, mb in self._shared:
                pairs = np.unique(np.stack([root[op], root[full]], 1), axis=0)
                if len(np.unique(pairs[:, 0])) == len(pairs):  # one class per operand channel: a plain tie
                    eq_a.append(op)
                    eq_b.append(full)
                    if summed:
                        sums.append((op, full))
                else:
                    frozen.append(op)
                    eq_a.append(ma)
                    eq_b.append(mb)
            eq_a, eq_b = np.concatenate(eq_a), np.concatenate(eq_b)
            root = connected_components(self.count, eq_a, eq_b)
        shared_parts = self._shared_parts(dep)
        if len(dep):
            # A parent read by one child only (a per-head sink logit broadcast over batch and positions) is
            # that child's own channel, not a KV head shared by several: they are tied.
            pairs = self._dep_pairs(dep, root)
            parents, children = np.unique(pairs[:, 1], return_counts=True)
            single = pairs[np.isin(pairs[:, 1], parents[children == 1])]
            if len(single):
                eq_a, eq_b = np.concatenate([eq_a, single[:, 0]]), np.concatenate([eq_b, single[:, 1]])
                root = connected_components(self.count, eq_a, eq_b)
            # A child that reads several parents (a query head reads its KV head's key and value) needs them
            # all: such parents are kept or removed together.
            first_parent = {}
            extra_a, extra_b = [], []
            for child, parent in self._dep_pairs(dep, root):
                if child in first_parent:
                    extra_a.append(first_parent[child])
                    extra_b.append(parent)
                else:
                    first_parent[child] = parent
            if extra_a:
                eq_a = np.concatenate([eq_a, np.array(extra_a)])
                eq_b = np.concatenate([eq_b, np.array(extra_b)])
                root = connected_components(self.count, eq_a, eq_b)
            dep = self._dep_pairs(dep, root)
            frozen.append(shared_parts[np.isin(root[shared_parts], dep[:, 1])])
        origin = np.concatenate(self.origin) if self.origin else np.zeros(0, np.int64)
        residual = np.zeros(self.count, dtype=bool)
        if sums:
            sa = np.concatenate([p[0] for p in sums])
            sb = np.concatenate([p[1] for p in sums])
            across = (origin[sa] != origin[sb]) & (origin[sa] >= 0) & (origin[sb] >= 0)
            residual[root[sa[across]]] = True
        parent = {int(c): int(p) for c, p in dep}
        frozen_splits = [(site, block[block >= 0]) for block, site in zip(self._splits, self._split_sites, strict=True)
                         if not self._rows_ok(np.where(block >= 0, root[np.maximum(block, 0)], NO_CHANNEL), parent)]
        frozen += [atoms for _, atoms in frozen_splits]
        return Solution(root, self._flag(frozen, root), residual, self._flag(self._reduced, root),
                        self._flag(self._head, root), dep, frozen_splits)
