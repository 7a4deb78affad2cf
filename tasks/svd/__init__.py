"""Stage `svd`: what SFT and RL do to the weight matrices (analysis.md §1-§3, §6).

Read in this order: `metrics` (the formulas of §1-§3 as tensor functions), `matrices`
(which weights, §1.1), `engine` (one cached SVD per checkpoint and matrix, §2),
`roles` (base / B / S / R and the default comparisons, §1.2), `analysis` (measuring, tables, store, Prefect stage).
"""

from tasks.svd.engine import SVD_CALLS, ColumnRequest, SvdCache, column_request, columns_plan, load_svd
from tasks.svd.matrices import Matrix, select_matrices
from tasks.svd.metrics import Factors, principal_angles, resolve_k
from tasks.svd.roles import plan_comparisons, select_roles
from tasks.svd.analysis import STAGE, Decompositions, analyse, artifact, artifact_inputs, decompose_stage, read_checkpoints, run, stage

__all__ = [
    "SVD_CALLS", "STAGE", "ColumnRequest", "Decompositions", "Factors", "Matrix", "SvdCache", "analyse", "artifact",
    "artifact_inputs", "column_request", "columns_plan", "decompose_stage", "load_svd", "plan_comparisons", "principal_angles", "read_checkpoints",
    "resolve_k", "run", "select_matrices", "select_roles", "stage",
]  # fmt: skip
