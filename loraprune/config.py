"""One typed config per pruning method: what `loraprune.prune(model, example_inputs, config)` runs.

Every config is a `SelectConfig` (how many units go, and where: ratio, scope, attention mode, round_to, ...)
plus its own method's options, so `LoRAPruneConfig(ratio=0.5, steps=200)` reads the way a user thinks of it.
A config validates itself when built and round-trips through `to_dict` / `config_from_dict`, so the plan and
the report record exactly the config that made them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from loraprune.lora.adapters import LORA_INITS
from loraprune.passes.select import SelectConfig

__all__ = ["CONFIGS", "ActivationConfig", "FlapConfig", "LoRAPruneConfig", "MagnitudeConfig", "PruneConfig",
           "RandomConfig", "TaylorConfig", "check_distillation", "config_from_dict", "make_config"]


@dataclass(kw_only=True)
class PruneConfig(SelectConfig):
    """The part every method shares: selection (inherited), the seed, and whether to count MACs for the report
    (one extra trace of the dense and of the compact model)."""

    criterion: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False  # scores from calibration batches (forward or backward passes)
    seed: int = 0
    count_macs: bool = True

    def selection(self) -> SelectConfig:
        """The selection options alone (what the plan records and `select_units` reads)."""
        return SelectConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SelectConfig)})

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.criterion, **dataclasses.asdict(self)}

    def criterion_options(self) -> dict[str, Any]:
        """Keywords for the criterion function (`passes.criteria.CRITERIA[self.criterion]`)."""
        return {"seed": self.seed}


def _check_positive(config: object, *names: str, minimum: int = 1) -> None:
    for name in names:
        if getattr(config, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(config, name)!r}")


@dataclass(kw_only=True)
class MagnitudeConfig(PruneConfig):
    """L2 magnitude of each unit's weights: no data needed."""

    criterion: ClassVar[str] = "magnitude"


@dataclass(kw_only=True)
class RandomConfig(PruneConfig):
    """Seeded random scores: the floor every criterion must beat."""

    criterion: ClassVar[str] = "random"


@dataclass(kw_only=True)
class _CalibratedConfig(PruneConfig):
    """A criterion that reads calibration batches, `batch_size` rows at a time."""

    needs_data: ClassVar[bool] = True
    batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "batch_size")

    def criterion_options(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size}


@dataclass(kw_only=True)
class TaylorConfig(_CalibratedConfig):
    """First-order Taylor |W ⊙ dL/dW| from full weight gradients on calibration batches (LLM-Pruner's)."""

    criterion: ClassVar[str] = "taylor"
    checkpointing: bool = False  # recompute each decoder layer in the backward pass: less memory

    def criterion_options(self) -> dict[str, Any]:
        return super().criterion_options() | {"checkpointing": self.checkpointing}


@dataclass(kw_only=True)
class ActivationConfig(_CalibratedConfig):
    """Minitron's activation criterion: channel activation sizes from forward passes only (no gradients)."""

    criterion: ClassVar[str] = "activation"


@dataclass(kw_only=True)
class FlapConfig(_CalibratedConfig):
    """FLAP: each channel's activation variance times its weights' squared norm, from forward passes only; a
    removed input channel's mean contribution moves into its layer's bias where the layer has one."""

    criterion: ClassVar[str] = "flap"


@dataclass(kw_only=True)
class LoRAPruneConfig(PruneConfig):
    """LoRAPrune (arXiv 2305.18403): LoRA fine-tuning while masks grow to `ratio` on a cubic schedule, units
    scored from the LoRA factors and their gradients only; then the masked channels are removed from the base
    weights and the factors alike. `steps=0` scores once on the calibration batches, without fine-tuning.

    `merge` folds the compact adapters into plain weights (the plan then uses the plain model's names);
    `init` is how the factors start (`LORA_INITS`: "pissa" puts the weights' top-r singular part in them).
    The defaults are the knobs measured best on SmolLM2-135M (docs/experiments.md): PiSSA factors, lr 3e-4,
    half the steps as a cool-down after the last cut, masks updated 40 times (`update_every` None).
    `distill` > 0 recovers by distillation from the dense model rebuilt in memory (`passes.schedule.DenseTeacher`).
    """

    criterion: ClassVar[str] = "lora"
    needs_data: ClassVar[bool] = True
    steps: int = 200
    lr: float = 3e-4
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    init: str = "pissa"
    target: Sequence[str] | None = None  # module-name suffixes; None = every linear layer but the output head
    update_every: int | None = None  # None: max(1, steps // 40)
    warmup: float = 0.1
    cooldown: float = 0.5
    lam: float = 0.9  # moving average of the scores over steps
    batch_size: int = 4
    weight_decay: float = 0.0
    merge: bool = True
    checkpointing: bool = False
    progress: bool = True
    distill: float = 0.0  # share of KL(dense teacher || student) in the loss; 0: the next-token loss alone
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; known: {', '.join(LORA_INITS)}")
        _check_positive(self, "steps", minimum=0)
        if self.update_every is None:
            self.update_every = max(1, self.steps // 40)
        _check_positive(self, "r", "alpha", "update_every", "batch_size")
        for name in ("warmup", "cooldown"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.lam < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {self.lam!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        check_distillation(self.distill, self.temperature)
        if self.target is not None and not isinstance(self.target, str):
            self.target = tuple(self.target)

    def criterion_options(self) -> dict[str, Any]:
        """The one-shot LoRA criterion's keywords (steps=0)."""
        return {"seed": self.seed, "lam": self.lam, "batch_size": self.batch_size, "r": self.r, "alpha": self.alpha,
                "init": self.init, "checkpointing": self.checkpointing}


CONFIGS: dict[str, type[PruneConfig]] = {c.criterion: c for c in (MagnitudeConfig, RandomConfig, TaylorConfig,
                                                                   ActivationConfig, FlapConfig, LoRAPruneConfig)}


def check_distillation(distill: float, temperature: float) -> None:
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill must be in [0, 1] (the share of the distillation loss), got {distill!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def make_config(criterion: str, **options: Any) -> PruneConfig:
    """The config of `criterion` built from whichever of `options` it has (a CLI's flat options, say)."""
    if criterion not in CONFIGS:
        raise ValueError(f"unknown criterion {criterion!r}; known: {', '.join(sorted(CONFIGS))}")
    cls = CONFIGS[criterion]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names})


def config_from_dict(data: dict[str, Any]) -> PruneConfig:
    """The inverse of `PruneConfig.to_dict`; unknown keys are an error, not silently dropped."""
    data = dict(data)
    cls = CONFIGS.get(data.pop("method", None))
    if cls is None:
        raise ValueError(f"unknown method in config {data!r}; known: {', '.join(sorted(CONFIGS))}")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no option {', '.join(sorted(unknown))}")
    return cls(**data)
