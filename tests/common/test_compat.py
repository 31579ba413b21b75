"""The third-party privates vitscale uses (vitscale.common.compat): each test fails if a release
of torch or submitit takes the private away or stops acting on it."""

import inspect
import os
import signal
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitscale.common import compat


@pytest.mark.slow  # torch.compile imports torch._dynamo: about 15 s on 2 cores
def test_uncompiled_unwraps_torch_compile_and_its_key_prefix():
    model = nn.Linear(3, 2)
    compiled = torch.compile(model)  # wraps at once; nothing compiles until the first call
    assert compat.uncompiled(compiled) is model
    assert compat.uncompiled(model) is model
    assert set(compiled.state_dict()) == {compat.COMPILED_PREFIX + k for k in model.state_dict()}


def test_pool_pids_are_the_workers():
    with ProcessPoolExecutor(max_workers=1) as pool:
        pid = pool.submit(os.getpid).result()
        assert compat.pool_pids(pool) == [pid]


class _Pids(Dataset):
    """Each item is the id of the process that made it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return os.getpid()


def test_shutdown_workers_ends_the_worker_processes_now():
    batches = iter(DataLoader(_Pids(), batch_size=1, num_workers=1))
    pid = int(next(batches)[0])
    assert pid != os.getpid()
    compat.shutdown_workers(batches)
    with pytest.raises(ProcessLookupError):  # joined, so gone: not a zombie waiting for collection
        os.kill(pid, 0)
    compat.shutdown_workers(iter(DataLoader(_Pids(), batch_size=1)))  # single-process: nothing to stop


def test_a_fused_optimizer_flag_grad_scaler_reads():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], fused=True)
    assert opt._step_supports_amp_scaling is True  # what fused optimizers set
    assert "_step_supports_amp_scaling" in inspect.getsource(torch.amp.GradScaler.step)
    compat.let_scaler_check_inf(opt)
    assert opt._step_supports_amp_scaling is False


def test_submitit_requeue_signal(monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert compat.submitit_requeue_signal() == signal.SIGUSR2  # submitit's default


def test_to_goes_through_apply_that_taught_modules_override():
    seen = []

    class Spy(nn.Linear):
        def _apply(self, fn, recurse=True):
            seen.append(fn)
            return super()._apply(fn, recurse)

    Spy(2, 2).to(torch.float64)
    assert seen
