"""Fault injection for resume tests: `RLHEAL_FAULT=<stage>` makes that stage raise."""

import os


class InjectedFault(RuntimeError):
    pass


def maybe_fail(stage: str) -> None:
    if stage in os.environ.get("RLHEAL_FAULT", "").split(","):
        raise InjectedFault(f"RLHEAL_FAULT asked stage {stage!r} to fail")
