"""rlheal: what SFT and RL do to a language model, as a cached, resumable Prefect study."""

__version__ = "0.1.0"
