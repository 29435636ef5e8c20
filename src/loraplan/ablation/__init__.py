"""The ablation sweep: spec, batches, engine, ledger, selection and the runner that ties them."""
