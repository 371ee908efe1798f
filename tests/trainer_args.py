"""Training arguments every in-process trainer test shares: CPU, fp32, no saving, log every step, no reporting."""

CPU_TRAINER_ARGS = {
    "report_to": "none",
    "bf16": False,
    "use_cpu": True,
    "save_strategy": "no",
    "logging_steps": 1,
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
}
