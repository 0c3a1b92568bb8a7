"""fitnets from Python: the commands as functions of the configs the command line composes.

    from fitnets_cli import api
    cfg = api.compose("train", ["dataset=mnist_subset", "schedule=kd"])   # the overrides of `fitnets train`
    result = api.train(cfg, run_dir="runs/kd")                            # what metrics.json holds
    student = api.load("runs/kd/checkpoints/student.pt")                  # an nn.Module in eval mode

Bad input raises ConfigError with the one-line message the command line prints. What a call leaves behind: the
run's directory; train-teacher (and train with teacher.auto_train) stores its teacher in the teacher store
(teacher_store=); the paper's CIFAR and SVHN preprocessing is cached in data.cache. A training call seeds torch's
global random generator from the config's seed, and puts torch's deterministic-algorithms setting back as it
found it. Image folders are scanned once per process, and again when a folder's entries change. The `fitnets`
command is a thin layer over these functions."""

import os
import time
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, open_dict
from torch import nn

import fitnets_cli.networks.zoo  # noqa: F401  (its networks become options of the teacher and student groups)
from fitnets_cli.config.commands import CONFIGS, explained, to_config
from fitnets_cli.config.errors import ConfigError


def composed(command: str, overrides: Sequence[str] = (), hydra: bool = False) -> DictConfig:
    """conf/ composed for `fitnets COMMAND OVERRIDES...` as Hydra composes it (hydra: with Hydra's own node, which
    names the run directory); inside a running Hydra app, by that app's config loader."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if command not in CONFIGS:
        raise ConfigError(f"unknown command {command!r}; commands are {', '.join(CONFIGS)}")
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(CONFIGS[command], overrides=list(overrides), return_hydra_config=hydra)
    with initialize_config_module("fitnets_cli.conf", version_base="1.3"):
        return hydra_compose(CONFIGS[command], overrides=list(overrides), return_hydra_config=hydra)


def typed(cfg: DictConfig, files: bool = True):
    """The composed config as the command's typed schema, checked, with an image-file dataset's shape and classes
    read from its files (checked on the way, before anything is written; files=False: not read)."""
    if "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    config = to_config(cfg)
    if not files or getattr(config, "dataset", None) is None or config.dataset.images is None or \
            getattr(config, "resume", None):
        return config
    from fitnets_cli.data.images import resolve   # PIL loads here: only image files need it

    return resolve(config)


def compose(command: str, overrides: Sequence[str] = ()):
    """The typed config of `fitnets COMMAND OVERRIDES...` (command: train, train-teacher, eval, compare, layers
    or export), composed from conf/ exactly as the command line does."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return typed(composed(command, overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(explained(err, command)) from None


def networks(cfg):
    """The networks of a `train` or `train-teacher` config, each built and traced once, and the plan of its hint
    pairs, checked before any teacher is looked up or trained; `train` and `train_teacher` take it as `built`."""
    from fitnets_cli.training.train import networks as build

    return build(cfg)


def run_dir_for(cfg, run_dir) -> Path | None:
    """The run directory: resume's (None: the run's own), the one given, else a new runs/<command>/<date_time>
    as on the command line. One that holds a run is refused."""
    from fitnets_cli.training.rundir import holds

    if cfg.resume:
        return None
    base = Path("runs", cfg.command, time.strftime("%Y-%m-%d_%H-%M-%S"))   # two calls in a second: _1, _2 ...
    path = Path(run_dir) if run_dir is not None else \
        next(p for p in (base.with_name(f"{base.name}_{n}" if n else base.name) for n in range(10**6)) if not p.exists())
    if holds(path):   # e.g. a reused sweep directory: never train over another run
        raise ConfigError(f"{path} holds {holds(path)}; resume it with `fitnets {cfg.command} resume={path}` or "
                          "choose another run directory (hydra.run.dir / hydra.sweep.dir; run_dir= in Python)")
    return path


def train(cfg, run_dir=None, built=None) -> dict:
    """`fitnets train`: the student through the schedule's stages; returns what its metrics.json holds. `built`:
    what `networks(cfg)` returned, to train those networks rather than build them again."""
    from fitnets_cli.training.train import train_student

    return restoring_determinism(train_student, cfg, run_dir_for(cfg, run_dir), built)


def train_teacher(cfg, run_dir=None, built=None) -> dict:
    """`fitnets train-teacher`: the teacher by backprop, stored for `train`; returns its metrics.json. `built`: as
    for `train`."""
    from fitnets_cli.training.train import train_teacher as train_it

    return restoring_determinism(train_it, cfg, run_dir_for(cfg, run_dir), built=built)


def restoring_determinism(run, *args, **kwargs):
    """run(*args, **kwargs), with torch's deterministic-algorithms setting (which a run sets from its config) and
    CUBLAS_WORKSPACE_CONFIG put back afterwards."""
    import torch

    was, workspace = torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        return run(*args, **kwargs)
    finally:
        torch.use_deterministic_algorithms(was)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


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
    from fitnets_cli.commands.eval import eval_command

    return eval_command(cfg)


def compare(cfg) -> list[dict]:
    """`fitnets compare`: one dict per row of its table."""
    from fitnets_cli.commands.compare import compare_command

    return compare_command(cfg)


def layers(cfg) -> dict:
    """`fitnets layers`: each network's taps and shapes, and the hint plan."""
    from fitnets_cli.commands.layers import layers_command

    return layers_command(cfg)


def export(cfg) -> dict:
    """`fitnets export`: the file written, its sidecar and the check of its logits."""
    from fitnets_cli.commands.export import export_command

    return export_command(cfg)


def load(checkpoint) -> nn.Module:
    """The network of any fitnets checkpoint (teacher or student, any source), with its weights, in eval mode,
    on the CPU; it takes images prepared as its dataset's (see `fitnets export`'s sidecar)."""
    import torch

    from fitnets_cli.networks.checkpoint import load_model

    return load_model(checkpoint, torch.device("cpu"))[0].eval()
