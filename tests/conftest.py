import os

# numpy's and scipy's BLAS (OpenBLAS) start a thread per core, which busy-wait beside pytest-xdist's
# other worker: the study's fits multiply tiny matrices that gain nothing from them, and they cost
# the analysis tests three times their CPU time. Set before numpy (imported by torch) loads BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vitscale.models import ViT, preset_names  # noqa: E402

# Under pytest-xdist (`make test` runs `-n auto`) the workers share the CPUs instead of each taking all.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ALL_PRESETS = preset_names()


def meta_model(cfg):
    """Build a model with no storage: enough for counting params, shapes and flops."""
    with torch.device("meta"):
        return ViT(cfg)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA device: skipped (and reported so) without one; `make gpu-check`
    runs them on a GPU (pytest -m cuda)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (make gpu-check runs the cuda tests on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def trained(monkeypatch):
    """The configs that reach training, recorded instead of trained (the config and CLI tests)."""
    from vitscale.train import engine  # here, not above: most tests never train

    seen = []
    done = engine.TrainResult(metrics={}, step=0, best=None)
    monkeypatch.setattr(engine, "train", lambda cfg, *args, **kwargs: seen.append(cfg) or done)
    return seen


@pytest.fixture
def logged():
    """The lines vitscale logs (INFO and up, as the CLI shows them: a warning reads
    "warning: ...") while the test runs, in order; clear() forgets those so far."""
    import logging

    from vitscale.common import logs

    lines = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    logger, handler = logging.getLogger(logs.ROOT), Collect()
    handler.setFormatter(logs.Prefix("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)
