"""Data-parallel LoRA-guided importance (LoRAPrune's criterion) on HF Accelerate.

Why: the LoRA criterion needs only the gradients of the small LoRA factors, so the expensive part is the
forward/backward over calibration tokens. Splitting every step's rows over processes and averaging the factor
gradients gives exactly the single-process gradient of the whole step's mean loss, at 1/world of the compute
per process; every process then runs the same `LoRAScorer.update()` on identical gradients, so all ranks end
with identical scores (and can each make the same pruning decision without a broadcast).

How the reduction is done: explicitly, one all-reduce (`accelerator.reduce(..., "sum")`) of the flattened
factor gradients per step, token-weighted (each process contributes n_local·grad(local mean loss), the sum
is divided by the total token count). That is the gradient of the mean loss over the concatenated step even
when padding or `-100` labels leave the shares with unequal token counts, where DDP's plain mean of the
per-process means would not be. It also leaves the model unwrapped: no `accelerator.prepare(model)`, no DDP
bucket set-up that snapshots `requires_grad` at wrap time (the scorer flips it: factors on, base off), and
base weights never get a `.grad`.

The main job (`accelerate launch ... -m loraprune compile ...`) uses the same reduction in every fine-tuning step
(`loraprune.parallel.DataParallel`).

Mapping to GPUs: the same code runs unchanged under `accelerate launch --multi_gpu --num_processes N -m
loraprune.distributed ...` (NCCL; put the model on `accelerator.device` first, as `main` does). With base weights
sharded by rows (FSDP2, `loraprune.sharded`) the scorer scores each process's rows where they lie
(`ShardedLoRAScorer`): `--sharded` runs the tiny test that way.

Launching on CPU (the test harness): `accelerate launch --cpu --num_processes 2` does NOT start two processes
in accelerate 1.15 (without an MPI hostfile its simple launcher runs one). Two local gloo processes come from
the torchrun-based launcher: `accelerate launch --multi_gpu --num_processes 2 -m loraprune.distributed --cpu
--tiny-test OUT.npz` (`--cpu` here makes `Accelerator(cpu=True)` pick MULTI_CPU/gloo; so does
ACCELERATE_USE_CPU=1).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from loraprune.ir.groups import ChannelGroup
from loraprune.lora.adapters import lora_layers, lora_params
from loraprune.lora.training import GradientStats, causal_lm_loss
from loraprune.parallel import end_launch, local_backward, reduce_gradients, shard_blocks, shard_step
from loraprune.passes.criteria import GroupScores
from loraprune.passes.criteria.lora import lora_criterion

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["accelerated_lora_scores", "main", "tiny_batches", "tiny_llama_model"]


# ----------------------------------------------------------------------------------------------- the criterion

def accelerated_lora_scores(model: nn.Module, groups: list[ChannelGroup], batches: Iterable | torch.Tensor, *,
                            accelerator: Accelerator | None = None, lam: float = 0.9, seed: int = 0, r: int = 8,
                            alpha: int = 16, batch_size: int = 4, shard: bool = True,
                            stats: GradientStats | None = None) -> GroupScores:
    """`lora_criterion`'s scores, computed data-parallel over the processes of `accelerator`.

    `batches` are the steps, as for `lora_criterion` (a [N, seq] tensor is cut into steps of `batch_size`
    rows); every process passes the same steps and, with `shard`, keeps its share of each (rows of a tensor
    or dict step by `accelerator.process_index`, or micro-batches of a list step round-robin). With
    `shard=False` the batches are taken as already this process's share (e.g. from a prepared DataLoader);
    every process must then pass the same number of steps. Per step, the factor gradients are reduced to the
    gradient of the mean loss over all processes' tokens and every process runs the same `LoRAScorer.update()`,
    so the returned scores are identical on all ranks and equal (to rounding) to `lora_criterion` on the
    concatenated steps. The model must be unwrapped (not DDP-prepared) and on the device its batches should
    go to. On a model without LoRA layers adapters are added (dropout 0, seeded) and removed afterwards.
    Base weights never get `.grad`; `requires_grad` flags (also those `add_lora` froze) and train/eval mode
    are restored.
    """
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index

    def backward(work: nn.Module, step) -> None:
        micro = shard_step(step, world, rank) if shard else (
            list(step) if isinstance(step, (list, tuple)) else [step])
        tokens, _ = local_backward(work, micro, causal_lm_loss)
        reduce_gradients(lora_params(lora_layers(work)), tokens, accelerator)

    return lora_criterion(model, groups, batches=batches, seed=seed, lam=lam, batch_size=batch_size, stats=stats,
                          r=r, alpha=alpha, backward=backward)


# ----------------------------------------------------------------------------------------------- test harness

TINY_VOCAB = 128


def tiny_llama_model(seed: int = 0, layers: int = 2) -> nn.Module:
    """A deterministic tiny LLaMA (GQA: 4 heads, 2 KV heads), the same on every process without a broadcast."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def tiny_batches(steps: int = 3, rows: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """`steps` deterministic token-id steps of [rows, seq] (no padding: every row has seq - 1 targets)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, TINY_VOCAB, (rows, seq), generator=g) for _ in range(steps)]


def _flatten(scores: GroupScores) -> dict[str, np.ndarray]:
    out = {f"units:{k}": np.asarray(v, dtype=np.float64) for k, v in sorted(scores.units.items())}
    out |= {f"kv:{k}": np.asarray(v, dtype=np.float64) for k, v in sorted(scores.kv.items())}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`accelerate launch ... -m loraprune.distributed --tiny-test OUT.npz`: score a tiny LLaMA data-parallel;
    rank 0 writes `units:<group>` / `kv:<group>` arrays, `world_size` and `max_rank_diff` (largest score
    difference between any rank and rank 0, gathered across processes: should be 0)."""
    from accelerate import Accelerator

    from loraprune.passes.dependency import analyze

    parser = argparse.ArgumentParser(prog="python -m loraprune.distributed", description=main.__doc__)
    parser.add_argument("--tiny-test", metavar="OUT.npz", required=True, help="write the tiny model's scores here")
    parser.add_argument("--cpu", action="store_true", help="Accelerator(cpu=True): gloo processes on CPU")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4, help="rows per step, split over the processes")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="model and LoRA init seed")
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--lam", type=float, default=0.9)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--sharded", action="store_true",
                        help="base weights sharded by rows (FSDP2); also record the largest tensor each layer's "
                             "scoring materialises, as a fraction of that layer's whole weight")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu)
    model = tiny_llama_model(args.seed).to(accelerator.device)
    batches = tiny_batches(args.steps, args.rows, args.seq, args.data_seed)
    groups = analyze(model, batches[0][:1].to(accelerator.device)).groups
    extra = {}
    with _watched_scoring() as seen:
        if args.sharded:
            shard_blocks(model, accelerator.device)
        scores = accelerated_lora_scores(model, groups, batches, accelerator=accelerator, lam=args.lam,
                                         seed=args.seed, r=args.r, alpha=args.alpha)
    if args.sharded:
        extra = {"largest_fraction": np.float64(max(f for f, _ in seen)), "gathered": np.int64(sum(g for _, g in seen)),
                 "layers_scored": np.int64(len(seen))}
    flat = _flatten(scores)
    mine = torch.from_numpy(np.concatenate([v.ravel() for v in flat.values()])).to(accelerator.device)
    everyone = accelerator.gather(mine[None])  # [world, n]: every rank's scores
    diff = float((everyone - everyone[:1]).abs().max())
    if accelerator.is_main_process:
        np.savez(args.tiny_test, world_size=np.int64(accelerator.num_processes), max_rank_diff=np.float64(diff),
                 **extra, **flat)
    accelerator.wait_for_everyone()
    return end_launch(0)


@contextmanager
def _watched_scoring() -> Iterator[list[tuple[float, bool]]]:
    """Record, for every sharded layer scored, the largest tensor its scoring materialised as a fraction of the
    layer's whole base weight, and whether the weight had to be gathered."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from loraprune.passes.criteria import lora

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
            return out

    seen: list[tuple[float, bool]] = []
    real = lora._local_importance

    def watched(module: nn.Module, rows):
        with Largest() as largest:
            out = real(module, rows)
        seen.append((largest.numel / module.get_base_layer().weight.numel(), rows.gathered))
        return out

    lora._local_importance = watched
    try:
        yield seen
    finally:
        lora._local_importance = real


if __name__ == "__main__":
    raise SystemExit(main())
