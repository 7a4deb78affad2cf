"""The drift stage (issue 19, in progress): label-free signals of how far a checkpoint has
moved from the base, on the fixed ID and OOD prompts. `signals` holds their math."""

from tasks.drift import signals

__all__ = ["signals"]
