"""pyproject.toml declares every third-party package vitscale's code imports: a module-level
import as a dependency, one inside a function (an optional backend) at least as an extra."""

import ast
import functools
import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution, where they differ, for packages not installed here (else read from
# the installed distributions' own records)
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "mlflow": "mlflow-skinny"}
# modules of a declared package that need another one: torch.utils.tensorboard writes with tensorboard
NEEDS = {"torch.utils.tensorboard": "tensorboard"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    """The distributions pyproject.toml declares: (dependencies, those of any extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {norm(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in reqs}  # noqa: E731
    extras = set().union(*map(names, project.get("optional-dependencies", {}).values()))
    return names(project["dependencies"]), extras


def imports(files) -> dict[str, bool]:
    """Every module `files` import from outside the standard library and itself, and whether
    some import of it runs when its file is imported (not only inside a function)."""
    found: dict[str, bool] = {}

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module]
            for name in names:
                if name.split(".")[0] not in sys.stdlib_module_names | {"vitscale"}:
                    found[name] = found.get(name, False) or not in_function
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    for path in files:
        visit(ast.parse(path.read_text(), str(path)), False)
    return found


@functools.cache
def installed() -> dict[str, list[str]]:
    return metadata.packages_distributions()  # top-level module -> distributions, from their records


def distributions(module: str) -> set[str]:
    """The distributions that may provide `module`: what the installed ones record, else the table."""
    top = module.split(".")[0]
    installed_here = installed().get(top, [])
    return {norm(d) for d in installed_here} | {norm(DISTRIBUTION.get(top, top))}


def test_every_imported_package_is_declared():
    deps, extras = declared()
    found = imports((ROOT / "vitscale").rglob("*.py"))
    assert {"torch", "numpy", "PIL"} <= {m.split(".")[0] for m in found}  # (the scan sees the code)
    missing = []
    for module, at_import in sorted(found.items()):
        need = {NEEDS[p] for p in NEEDS if module == p or module.startswith(p + ".")}
        wanted = [need] if need else [distributions(module)]
        for options in wanted:
            allowed = deps if at_import else deps | extras
            if not options & allowed:
                where = "dependencies" if at_import else "dependencies or an extra"
                missing.append(f"{module} ({' or '.join(sorted(options))}) in {where}")
    assert not missing, "pyproject.toml does not declare: " + "; ".join(missing)


def test_the_scan_tells_module_level_imports_from_lazy_ones(tmp_path):
    """The check above would pass a module-level `import wandb` if it took it for a lazy one."""
    (tmp_path / "m.py").write_text("import numpy as np\nfrom . import sibling\n\ndef f():\n    import wandb\n"
                                   "    g = lambda: __import__('x')\n\nclass C:\n    from PIL import Image\n"
                                   "    def m(self):\n        import mlflow.entities\n")
    found = imports([tmp_path / "m.py"])
    assert found == {"numpy": True, "wandb": False, "PIL": True, "mlflow.entities": False}
    assert distributions("PIL.Image") == {"pillow"} and distributions("yaml") == {"pyyaml"}


def test_version_is_the_installed_distributions(capsys):
    from vitscale import __version__
    from vitscale.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out.strip() == f"vitscale {metadata.version('vitscale')}"
    assert metadata.version("vitscale") == project["version"] == __version__


def test_license_is_apache_2_in_the_file_and_the_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    # setuptools 77 and newer write an SPDX License-Expression for it, older ones a License field
    installed = metadata.metadata("vitscale")
    assert (installed["License-Expression"] or installed["License"]) == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "9. Accepting Warranty or Additional Liability." in text and text.count("\n") > 190


BLOCK_PYAV = """
import importlib.abc, sys

class NoPyAV(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "av" or name.startswith("av."):
            raise ImportError("no module named av (blocked)")

sys.meta_path.insert(0, NoPyAV())
"""


def test_vitscale_imports_without_pyav_and_says_so_where_video_is_read():
    """A machine without PyAV (a GPU image) still runs vitscale on images: nothing imports av until
    a video is read, and reading one says in one line what to install."""
    import subprocess

    code = BLOCK_PYAV + """
import vitscale.cli, vitscale.train.engine, vitscale.data, vitscale.runs.export
from vitscale.data.video import pyav
from vitscale.common.errors import UserError
assert "av" not in sys.modules
try:
    pyav()
except UserError as e:
    print("refused:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "refused: reading videos needs PyAV: pip install av"


def test_the_public_names_are_what_a_notebook_needs():
    import vitscale

    assert set(vitscale.__all__) <= set(dir(vitscale))
    cfg = vitscale.preset("Ti/16")
    assert isinstance(cfg, vitscale.ViTConfig) and isinstance(vitscale.ViT, type)
    assert round(vitscale.analytic_cost(cfg).flops / 1e9, 2) == 1.26  # ViT-Ti/16, 224 px
    assert vitscale.scale(cfg, "w", 2.0).width > cfg.width
    assert "pico/4" in vitscale.preset_names()
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        vitscale.nothing  # noqa: B018


@pytest.mark.slow
def test_the_lazy_public_names_are_the_librarys_own():
    import vitscale
    import vitscale.train.engine as engine  # the subpackages stay reachable beside the names
    from vitscale.runs.predict import LoadedRun, load_run
    from vitscale.study.config import StudyConfig
    from vitscale.study.runner import run_study
    from vitscale.train.config import RunConfig

    assert vitscale.run_training is engine.train
    assert (vitscale.run_study, vitscale.load_run, vitscale.LoadedRun) == (run_study, load_run, LoadedRun)
    assert (vitscale.RunConfig, vitscale.StudyConfig) == (RunConfig, StudyConfig)
    assert all(getattr(vitscale, name) is not None for name in vitscale.__all__)


@pytest.mark.slow
def test_the_wheel_ships_py_typed(tmp_path):
    """PEP 561: type checkers read vitscale's hints only where the installed package has py.typed."""
    import shutil
    import subprocess
    import zipfile

    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(ROOT / "vitscale", src / "vitscale", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("vitscale-*.whl")
    assert "vitscale/py.typed" in zipfile.ZipFile(wheel).namelist()
