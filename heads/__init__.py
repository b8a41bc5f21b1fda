"""Detector heads on cached embeddings. Knows tensors, never images.

Public API (the CLI `dfhead` is a thin layer over it):
    heads.run.fit(store_dir, config) -> run dir          heads.run.sweep(store_dir, configs) -> (dir, leaderboard)
    heads.run.grid(base, seeds=N, **lists) -> configs    heads.run.evaluate_run / predict_store / list_runs
    heads.config.make_config(preset, **overrides)        heads.config.RunConfig (every setting)
    heads.data.load_data(store, config) -> Data          heads.train.train(store or Data, configs) -> (results, data)
    heads.losses: cvar_loss, pairwise_auc_loss, vs_logits, head_loss (tensors in, tensors out),
                  PER_SAMPLE_LOSSES, AUC_TERMS (registries), Objective (a group's loss)
    heads.metrics: roc_auc, roc_points, average_precision, eer, tpr_at_fpr, threshold_metrics, evaluate,
                   pick_threshold
    heads.optim: BatchedAdamW, SAM            heads.models: BatchedMLP, BatchedLinear, HEAD_KINDS, build_head
    heads.calibration: fit_calibration, Calibration, ece, nll_from_logits, brier, reliability
    heads.export: export_run(run_dir, out) -> one safetensors file, read_export(path) -> (config, tensors)
"""
