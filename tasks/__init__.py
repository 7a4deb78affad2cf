"""One module per stage of the study, named as the stage: data, model, pretrain, sft, rl, eval, svd, edit, report."""
