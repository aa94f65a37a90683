"""Evaluation under the fixed protocol of the design notes, so numbers compare across runs and tools.

Perplexity is the exp of the mean next-token NLL over non-overlapping windows of held-out text; every
model and baseline in a table is measured on the same windows. The model may be a Hugging Face causal LM
(also PEFT-wrapped) or any callable mapping `[batch, seq]` token ids to `[batch, seq, vocab]` logits
(a rewritten compact module, an ONNX Runtime wrapper).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loraprune.data import Corpus, TextTokenizer, token_windows

if TYPE_CHECKING:
    from loraprune.parallel import DataParallel

DEFAULT_PROMPTS = (
    "The import statement",
    "In Python, a list comprehension",
    "A function definition",
)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity with what it was measured on; `tokens` counts predicted tokens (window_len - 1 each)."""

    ppl: float
    nll: float
    windows: int
    window_len: int
    tokens: int


def perplexity(model: Callable[..., Any], windows: torch.Tensor, batch_size: int = 4,
               progress: bool = True, parallel: DataParallel | None = None) -> PerplexityResult:
    """Mean next-token NLL inside each window, and its exp.

    Each window is scored on its own (no context carried over), so the result does not depend on batch size.
    Modules are measured in eval mode (dropout off) and their previous mode is restored afterwards, so this
    can run in the middle of fine-tuning. With `parallel` each process scores its share of the windows and the
    NLL sums are reduced: every process returns the same figure.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a non-empty [n, window>=2] tensor, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = _device_of(model)
    total = 0.0
    mine = windows if parallel is None else parallel.shard(windows)
    starts = range(0, mine.shape[0], batch_size)
    with torch.no_grad(), _eval_mode(model):
        for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
            ids = mine[start:start + batch_size].to(device)
            logits = _logits(model, ids)[:, :-1].float()
            targets = ids[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="sum").item()
    if parallel is not None:
        total = parallel.sum(total)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = total / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, windows=windows.shape[0], window_len=windows.shape[1],
                            tokens=tokens)


def heldout_windows(corpus: Corpus, tokenizer: TextTokenizer, window: int = 256,
                    max_windows: int | None = 64) -> torch.Tensor:
    """The protocol's evaluation windows: the first `max_windows` windows of the corpus's held-out text."""
    return token_windows(corpus.held_out, tokenizer, window, max_windows)


def sample_generations(model: Callable[..., Any], tokenizer: Any, prompts: Sequence[str] | None = None,
                       max_new_tokens: int = 32) -> list[dict[str, Any]]:
    """Greedy continuations of a few prompts, a quick sight check that a pruned model still writes text.

    Decoding is a plain greedy loop over full forward passes (no KV cache, no `generate`): it is
    deterministic, needs only the logits interface, and so also works for modules whose cache shapes a
    rewrite changed. The tokenizer needs `encode`, `decode` and `eos_token_id` (a HF tokenizer has them).
    """
    device = _device_of(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    results = []
    with torch.no_grad(), _eval_mode(model):
        for prompt in DEFAULT_PROMPTS if prompts is None else prompts:
            ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
            new: list[int] = []
            for _ in range(max_new_tokens):
                token = int(_logits(model, ids)[0, -1].argmax())
                if token == eos:
                    break
                new.append(token)
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            results.append({"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
                            "new_tokens": len(new)})
    return results


def _logits(model: Callable[..., Any], ids: torch.Tensor) -> torch.Tensor:
    """Objects with a `config` (HF models, PEFT wrappers) take keyword inputs; other callables take ids."""
    out = model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, tuple | list):
        out = out[0]
    return torch.as_tensor(out)


def _device_of(model: Callable[..., Any]) -> torch.device:
    if isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model: Callable[..., Any]) -> Iterator[None]:
    """Dropout off while measuring; each submodule's own mode is restored, since a mix is legitimate."""
    modes = {m: m.training for m in model.modules()} if isinstance(model, torch.nn.Module) else {}
    for module in modes:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)
