"""Importance criteria, one registry: `CRITERIA[name](model, groups, **options) -> GroupScores`.

Importing this package registers every criterion: weight-only (magnitude, random), forward-only (activation,
flap), LoRA-gradient (lora, LoRAPrune's) and full-gradient (taylor).
"""

from loraprune.passes.criteria import activations, lora, taylor, weights
from loraprune.passes.criteria.scores import (
    CRITERIA,
    GroupScores,
    annotate_scores,
    group_scores,
    index_scores,
    register_criterion,
    scores_from_meta,
)

__all__ = ["CRITERIA", "GroupScores", "activations", "annotate_scores", "group_scores", "index_scores", "lora",
           "register_criterion", "scores_from_meta", "taylor", "weights"]
