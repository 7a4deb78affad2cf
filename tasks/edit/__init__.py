"""Stage `edit`: rotation-editing experiments (analysis.md §4, §6).

Read in this order: `formulas` (index sets and E0/E1/E2/E4 as tensor functions, §4.1),
`grid` (variants, E3 layer ranges, the §4.3 grids, the companion paper's claims), `apply`
(which matrices, edits written in place on the resident target and restored, §4.2, §4.5),
`recovery` (ρ with its paired bootstrap, damage fraction, §4.4), `sweep` (one cached
Prefect task per variant, the study tables, §6).

Wiring (flows/study.py), after the svd stage:

    roles = edit.read_roles(svd_dir)                  # checkpoint_roles
    ckpts = svd.read_checkpoints(checkpoint_parquets)    # sft (+ rl) checkpoints tables
    for v in edit.plan(cfg, roles, ckpts):            # resolved grid incl. baselines
        edit.stage(artifact=edit.artifact(st, cfg, v, ckpts, data_dir), cfg=cfg,
                      variant=v, roles=svd_dir, checkpoints=checkpoint_parquets, data=data_dir)
    edit.collect_stage(artifact=edit.collect_artifact(st, cfg, paths), cfg=cfg, paths=paths)
"""

from tasks.edit.apply import applied, edited, fingerprint, n_layers, resident
from tasks.edit.formulas import METHODS, edit_matrix, index_set, resolve_edit_k
from tasks.edit.grid import claim_variants, column_request, column_requests, resolve_layers, variant_id, variants
from tasks.edit.recovery import damage_fraction, paired_bootstrap, recovery_fraction
from tasks.edit.sweep import (
    SCHEMAS, STAGE, artifact, collect, collect_artifact, collect_stage, edit_and_evaluate, plan, read_roles, run,
    run_variant, stage, sweep_size,
)  # fmt: skip

__all__ = [
    "METHODS", "SCHEMAS", "STAGE", "applied", "artifact", "claim_variants", "collect", "collect_artifact",
    "collect_stage", "column_request", "column_requests", "damage_fraction", "edit_and_evaluate", "edit_matrix", "edited", "fingerprint", "index_set",
    "n_layers", "paired_bootstrap", "plan", "read_roles", "recovery_fraction", "resident", "resolve_edit_k", "resolve_layers", "run",
    "run_variant", "stage", "sweep_size", "variant_id", "variants",
]  # fmt: skip
