"""Training: AdamW with fp32 master weights (`optimizer`), loss scaling (`grad_scaler`), the lr schedule
(`schedule`), one iteration (`step`), evaluation (`evaluate`), metric sinks (`metrics`), run assembly
(`builders`) and the loop (`train`: `build_run`, `train`, `pretrain`)."""
