"""One training engine for every task: run configs and recipes (config), the loop (engine), the
shape of each step (steps), optimizers and schedules, fp16 scaling, EMA, loggers, and the
training step's counted cost (flops)."""
