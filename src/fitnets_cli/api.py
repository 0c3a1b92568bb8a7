"""fitnets from Python: the commands as functions of the configs the command line composes.

    from fitnets_cli import api
    cfg = api.compose("train", ["dataset=mnist_subset", "schedule=kd"])   # the overrides of `fitnets train`
    result = api.train(cfg, run_dir="runs/kd")                            # what metrics.json holds
    student = api.load("runs/kd/checkpoints/student.pt")                  # an nn.Module in eval mode

Bad input raises ConfigError with the one-line message the command line prints. Nothing but the run's own
directory is written, and no state is left behind between calls; the `fitnets` command is a thin layer over
these functions."""

import time
from pathlib import Path
from typing import Sequence

from torch import nn

from fitnets_cli.config import ConfigError


def compose(command: str, overrides: Sequence[str] = ()):
    """The typed config of `fitnets COMMAND OVERRIDES...` (command: train, train-teacher, eval, compare, layers
    or export), composed from conf/ exactly as the command line does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fitnets_cli.cli import COMMANDS, explained, with_data
    from fitnets_cli.commands import to_config

    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; commands are {', '.join(COMMANDS)}")
    try:
        with initialize_config_module("fitnets_cli.conf", version_base="1.3"):
            cfg = hydra_compose(COMMANDS[command][0], overrides=list(overrides))
        return with_data(to_config(cfg))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(explained(err, command)) from None


def run_dir_for(cfg, run_dir) -> Path | None:
    """The run directory: resume's (None: the run's own), the one given, else a new runs/<command>/<date_time>
    as on the command line. One that holds a run is refused."""
    from fitnets_cli.checkpoint import holds

    if cfg.resume:
        return None
    base = Path("runs", cfg.command, time.strftime("%Y-%m-%d_%H-%M-%S"))   # two calls in a second: _1, _2 ...
    path = Path(run_dir) if run_dir is not None else \
        next(p for p in (base.with_name(f"{base.name}_{n}" if n else base.name) for n in range(10**6)) if not p.exists())
    if holds(path):   # e.g. a reused sweep directory: never train over another run
        raise ConfigError(f"{path} holds {holds(path)}; resume it with `fitnets {cfg.command} resume={path}` or "
                          "choose another run directory (hydra.run.dir / hydra.sweep.dir; run_dir= in Python)")
    return path


def train(cfg, run_dir=None) -> dict:
    """`fitnets train`: the student through the schedule's stages; returns what its metrics.json holds."""
    from fitnets_cli.train import train_student

    return train_student(cfg, run_dir_for(cfg, run_dir))


def train_teacher(cfg, run_dir=None) -> dict:
    """`fitnets train-teacher`: the teacher by backprop, stored for `train`; returns its metrics.json."""
    from fitnets_cli.train import train_teacher as train_it

    return train_it(cfg, run_dir_for(cfg, run_dir))


def objective(metrics: dict, name: str = "valid_error") -> float:
    """The figure of a run's metrics that a sweep minimises: valid_error (the last stage's best validation error,
    the test error where there is no validation split) or a dotted path into metrics.json (test.error)."""
    if name == "valid_error":
        last = metrics["stages"][-1]   # of the validated phase, where retrain_full retrained on train + valid
        value = last["best_valid"] if last["best_valid"] is not None else metrics["test"]["error"]
    else:
        value = metrics
        for key in name.split("."):
            value = value[int(key)] if isinstance(value, list) else value.get(key) if isinstance(value, dict) else None
            if value is None:
                raise ConfigError(f"objective={name}: metrics.json has no {key!r} there")
    return float(value)


def evaluate(cfg) -> dict:
    """`fitnets eval`: the test loss, accuracy and error of cfg.checkpoint."""
    from fitnets_cli.evaluate import eval_command

    return eval_command(cfg)


def compare(cfg) -> list[dict]:
    """`fitnets compare`: one dict per row of its table."""
    from fitnets_cli.compare import compare_command

    return compare_command(cfg)


def layers(cfg) -> dict:
    """`fitnets layers`: each network's taps and shapes, and the hint plan."""
    from fitnets_cli.layers import layers_command

    return layers_command(cfg)


def export(cfg) -> dict:
    """`fitnets export`: the file written, its sidecar and the check of its logits."""
    from fitnets_cli.export import export_command

    return export_command(cfg)


def load(checkpoint) -> nn.Module:
    """The network of any fitnets checkpoint (teacher or student, any source), with its weights, in eval mode,
    on the CPU; it takes images prepared as its dataset's (see `fitnets export`'s sidecar)."""
    import torch

    from fitnets_cli.checkpoint import load_model

    return load_model(checkpoint, torch.device("cpu"))[0].eval()
