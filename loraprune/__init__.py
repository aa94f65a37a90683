"""loraprune: structured pruning of transformer models, guided by LoRA, compiled to compact ONNX.

One verb with a typed config per method: `loraprune.prune(model, example_inputs, LoRAPruneConfig(ratio=0.2))`.
"""

from loraprune.api import PruneReport, PruneResult, prune
from loraprune.config import (
    ActivationConfig,
    FlapConfig,
    LoRAPruneConfig,
    MagnitudeConfig,
    PruneConfig,
    RandomConfig,
    TaylorConfig,
)
from loraprune.ir.plan import PlanError, PrunePlan
from loraprune.models.save import load_pretrained, save_pretrained
from loraprune.passes.dependency import Analysis, analyze
from loraprune.passes.rewrite import apply_plan
from loraprune.passes.select import SelectConfig

__all__ = ["ActivationConfig", "Analysis", "FlapConfig", "LoRAPruneConfig", "MagnitudeConfig", "PlanError",
           "PruneConfig", "PruneReport", "PruneResult", "PrunePlan", "RandomConfig", "SelectConfig", "TaylorConfig",
           "analyze", "apply_plan", "load_pretrained", "prune", "save_pretrained"]
