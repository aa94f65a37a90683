"""loraprune: structured pruning of transformer models, guided by LoRA, compiled to compact ONNX."""

from loraprune.api import PruneResult, prune
from loraprune.ir.plan import PlanError, PrunePlan
from loraprune.passes.dependency import Analysis, analyze
from loraprune.passes.rewrite import apply_plan
from loraprune.passes.select import SelectConfig

__all__ = ["Analysis", "PlanError", "PruneResult", "PrunePlan", "SelectConfig", "analyze", "apply_plan", "prune"]
