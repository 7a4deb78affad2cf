"""One module per stage of the study: data, sft, rl, evaluate, svd, editing, report."""
