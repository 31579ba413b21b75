"""Every use of a third-party private name, in one place.

Each is a small function that says why the private is used and what breaks if a release of
torch or submitit takes it away; tests/common/test_compat.py pins each one, so an upgrade that removes
one fails a test instead of quietly changing behaviour. Callers import these; nothing else in
vitscale reads a private attribute of another package.

One use cannot move here: `tasks.distill.Taught` overrides `nn.Module._apply`, the method
`.to()`, `.cuda()` and `.half()` all go through, so that the frozen teacher it holds outside
its parameters moves with it. test_compat pins that `.to()` still calls `_apply`.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import torch
from torch import nn

# The key prefix of a torch.compile'd module's state dict: compile wraps the module in an
# OptimizedModule that holds it as `_orig_mod`, so every parameter name gains this prefix.
COMPILED_PREFIX = "_orig_mod."


def uncompiled(module: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (its `_orig_mod`), or `module` itself if not compiled.

    torch offers no public way back to the wrapped module. Used to see a DistributedDataParallel
    inside a compiled model (to skip its all-reduce on accumulation steps). If the attribute goes,
    this returns the wrapper: DDP's `no_sync` is then missed and gradients are all-reduced on every
    micro-step, slower but the same result.
    """
    return getattr(module, "_orig_mod", module)


def pool_pids(pool: ProcessPoolExecutor) -> list[int]:
    """The process ids of a ProcessPoolExecutor's workers (its private `_processes`, pid -> process).

    The executor has no public list of its workers, and a study passes SIGINT / SIGTERM on to them
    so that a running trial stops at a step's end and saves. If the attribute goes, this returns
    [] and the workers only get the signals the terminal sends to the whole process group.
    """
    return list(getattr(pool, "_processes", None) or {})


def shutdown_workers(batches) -> None:
    """Stop a DataLoader iterator's worker processes (and pin-memory thread) now.

    torch's multi-process iterator stops them in its private `_shutdown_workers`, which it
    otherwise calls only when the iterator is collected, and a traceback holding the iterator
    delays that. A single-process iterator has nothing to stop. If the method goes, this does
    nothing: the workers end when the iterator is collected, as before this existed.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def let_scaler_check_inf(opt: torch.optim.Optimizer) -> None:
    """Make torch.amp.GradScaler do its own found-inf test and skip for `opt`.

    A fused optimizer sets `_step_supports_amp_scaling`, and GradScaler.step then hands it the
    found-inf flag to test inside its kernel; with FSDP2's DTensor state that kernel fails on the
    flag's shape. Clearing the flag makes GradScaler test it and skip the step itself. If torch
    stops reading the attribute, the fused path comes back and a sharded fp16 run fails at its
    first step (test_compat checks GradScaler.step still reads it).
    """
    opt._step_supports_amp_scaling = False


def submitit_requeue_signal() -> int:
    """The signal submitit's job environment acts on to checkpoint and requeue a Slurm task.

    submitit picks it in the private `JobEnvironment._usr_sig` (SIGUSR2 by default, or what
    SUBMITIT_PREEMPT_SIGNAL names), and vitscale installs its own handler on that signal so a
    trial saves at a step's end before submitit requeues it. If it goes, this raises
    AttributeError when a Slurm job starts. Imports submitit, which only a Slurm study needs.
    """
    from submitit import JobEnvironment

    return JobEnvironment._usr_sig()
