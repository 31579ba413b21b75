"""Launcher arguments (study.launcher_args): KEY=VALUE pairs checked against a typed table per
launcher (LAUNCHER_ARGS) when the study's config is made, before anything is written or started."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass

import yaml

from vitscale.common.errors import UserError


@dataclass(frozen=True)
class Arg:
    """A launcher argument's type and range, read from its KEY=VALUE text."""

    type: type  # int, float, bool, str, list (of strings) or dict
    least: float | None = None  # ints and floats: the smallest allowed
    above: bool = False  # floats: strictly above `least`
    choices: tuple[str, ...] = ()  # strings: the only values allowed

    def read(self, key: str, text: str):
        """The value of `text`, or a one-line UserError saying what `key` takes."""
        try:
            value = self._parse(text.strip())
        except (ValueError, yaml.YAMLError):
            value = None
        if value is None:
            raise UserError(f"launcher argument {key} must be {self.wants()}, got {text!r}")
        return value

    def _parse(self, text: str):
        if self.type is bool:
            return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
                text.lower())
        if self.type in (int, float):
            value = self.type(text)
            ok = math.isfinite(value) and (self.least is None or value > self.least
                                           or (value == self.least and not self.above))
            return value if ok else None
        if self.type is str:
            return text if text and (not self.choices or text in self.choices) else None
        value = yaml.safe_load(text)
        if self.type is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        return value if ok else None

    def wants(self) -> str:
        if self.type is bool:
            return "true or false"
        if self.type in (int, float):
            what = "an integer" if self.type is int else "a number"
            return f"{what} above {self.least:g}" if self.above else f"{what} of {self.least:g} or more"
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        return {str: "a string that is not empty", list: "a list of strings, e.g. [module load cuda]",
                dict: "a mapping, e.g. {reservation: mine}"}[self.type]


_TEXT = Arg(str)
# Slurm's: submitit's shared parameters (AutoExecutor._typed_parameters, checked by a test), then the
# slurm_ ones most clusters need; `cluster` picks submitit's executor and `retries` is vitscale's.
LAUNCHER_ARGS: dict[str, dict[str, Arg]] = {
    "local": {},
    "slurm": {
        "cluster": Arg(str, choices=("slurm", "local", "debug")), "retries": Arg(int, 0),
        "name": _TEXT, "timeout_min": Arg(int, 1), "mem_gb": Arg(float, 0, above=True), "nodes": Arg(int, 1),
        "cpus_per_task": Arg(int, 1), "gpus_per_node": Arg(int, 0), "tasks_per_node": Arg(int, 1),
        "stderr_to_stdout": Arg(bool),
        **{f"slurm_{k}": _TEXT for k in ("partition", "account", "qos", "constraint", "exclude", "nodelist",
                                         "gres", "mem", "mem_per_cpu", "mem_per_gpu", "comment", "mail_type",
                                         "mail_user", "dependency", "wckey", "job_name")},
        "slurm_time": Arg(int, 1), "slurm_signal_delay_s": Arg(int, 0),
        "slurm_array_parallelism": Arg(int, 1), "slurm_cpus_per_gpu": Arg(int, 1),
        "slurm_gpus_per_task": Arg(int, 0), "slurm_exclusive": Arg(bool),
        "slurm_use_srun": Arg(bool), "slurm_setup": Arg(list), "slurm_srun_args": Arg(list),
        "slurm_additional_parameters": Arg(dict),
    },
    "ray": {"num_cpus": Arg(int, 1), "num_gpus": Arg(float, 0), "max_retries": Arg(int, -1), "address": _TEXT,
            "ranks": Arg(int, 1), "retries": Arg(int, 0)},
}

def options(launcher: str, pairs: tuple[str, ...]) -> dict:
    """launcher_args' KEY=VALUE pairs as typed values, each checked against the launcher's table
    (LAUNCHER_ARGS): one-line UserErrors, before anything is written or started."""
    table = LAUNCHER_ARGS[launcher]
    if pairs and not table:
        raise UserError("launcher_args are for --launcher slurm or ray; the local launcher takes --workers")
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"launcher argument {p!r} is not KEY=VALUE (e.g. timeout_min=240)")
        if key not in table:
            raise UserError(f"launcher arguments for {launcher}: unknown {key}; known: {', '.join(table)}")
        if key in out:
            raise UserError(f"launcher argument {key} is given twice; give it once")
        out[key] = table[key].read(key, value)
    return out


def checked(launcher: str, opts: dict) -> dict:
    """Typed arguments given in code (a test, a library caller) checked as the CLI's pairs are."""
    return options(launcher, tuple(f"{k}={v}" for k, v in opts.items()))


def cluster(opts: dict) -> str:
    """Submitit's executor: Slurm's where sbatch is; its local or debug one only where named."""
    cluster = opts.pop("cluster", "slurm")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("no Slurm here (sbatch not found): run the study where sbatch is (a Slurm login "
                        "node), or use --launcher local; --launcher-arg cluster=local runs the jobs with "
                        "submitit's local executor on this machine")
    return cluster

