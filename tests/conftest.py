import pytest
import torch

from vitscale.models import ViT, preset_names


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ALL_PRESETS = preset_names()


def meta_model(cfg):
    """Build a model with no storage: enough for counting params, shapes and flops."""
    with torch.device("meta"):
        return ViT(cfg)
