"""Set-up of each Dask worker process rlheal starts (`runner.kind: dask`, a LocalCluster).

Loaded by the worker at start (distributed's preload): the stages log their progress (SFT
steps, RL updates, evaluations) through the `rlheal` loggers at INFO, which the flow's
process prints; a worker inherits Prefect's console logging at WARNING, which dropped them.
"""

import logging


def dask_setup(worker) -> None:  # distributed's preload hook
    logging.getLogger("rlheal").setLevel(logging.INFO)
