"""One training engine for every task: run configs and recipes (config), the loop (engine), saving
and resuming (checkpointer), what a run trains at (inputs), the shape of each step (steps), DDP and
FSDP (parallel), optimizers and schedules, fp16 scaling, EMA, metrics.jsonl and the loggers, and
the training step's counted cost (flops)."""
