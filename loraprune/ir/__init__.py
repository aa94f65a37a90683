"""The IR: a traced program (torch.export FX graph + state_dict names), channel groups and prune plans."""

from loraprune.ir.groups import ChannelGroup, FrozenDim
from loraprune.ir.trace import TracedProgram, TraceError, trace

__all__ = ["ChannelGroup", "FrozenDim", "TraceError", "TracedProgram", "trace"]
