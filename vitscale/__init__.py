"""vitscale: design, scale, train and benchmark vanilla Vision Transformers.

What a notebook needs, in one namespace::

    import vitscale as vs

    cfg = vs.preset("S/16")                     # a ViTConfig, decoded from its name
    vs.analytic_cost(cfg).flops                 # multiply-adds, params, activations
    bigger = vs.scale(cfg, "d1_w8_r1", 4.0)     # 4x the flops, mostly by width
    model = vs.ViT(bigger)
    result = vs.run_training(vs.RunConfig())    # train (or resume) one run
    summary = vs.run_study(vs.StudyConfig())    # size, train and analyse a scaling study
    run = vs.load_run("runs/my-run")            # a finished run's model, config and class names

The training and study functions are not named `train` and `study`: those are vitscale's
subpackages (vitscale.train, vitscale.study), and a function of the same name here would
hide them from `import vitscale.train.engine as engine`.
"""

from vitscale.cost.complexity import cost as analytic_cost
from vitscale.cost.scaling import scale
from vitscale.models.presets import preset, preset_names
from vitscale.models.vit import ViT, ViTConfig

__version__ = "0.1.0"

# name -> the module that defines it, imported when first asked for: they bring in the data,
# training, study and export code, and `import vitscale` stays light without them.
_LAZY = {
    "LoadedRun": "vitscale.runs.predict",
    "load_run": "vitscale.runs.predict",
    "RunConfig": "vitscale.train.config",
    "StudyConfig": "vitscale.study.config",
    "run_study": "vitscale.study.runner",
    "run_training": "vitscale.train.engine",
}
# the engine's function is `train`; here it is `run_training` (see the module docstring)
_RENAMED = {"run_training": "train"}

__all__ = ["LoadedRun", "RunConfig", "StudyConfig", "ViT", "ViTConfig", "__version__", "analytic_cost",
           "load_run", "preset", "preset_names", "run_study", "run_training", "scale"]


def __getattr__(name: str):
    """The heavy public names (`_LAZY`), imported on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'vitscale' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
