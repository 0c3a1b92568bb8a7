"""`fitnets train` and `fitnets train-teacher`: a run's networks, data and stages, handed to the loop
(loop.fit), and what the run leaves behind (rundir.finish)."""

import time
from dataclasses import replace
from pathlib import Path

import torch

from fitnets_cli import dist
from fitnets_cli.checkpoint import atomic_write, load_payload
from fitnets_cli.commands import TeacherConfig, TrainConfig
from fitnets_cli.config import ConfigError
from fitnets_cli.data import load_data
from fitnets_cli.hints import make_regressors, plan_hints, plan_table
from fitnets_cli.loop import Run, fit
from fitnets_cli.networks import build_network, network_of
from fitnets_cli.rundir import finish, prepare, provenance, tensorboard
from fitnets_cli.stages import Session, Stage, make_stages
from fitnets_cli.ui import console


def train_student(cfg: TrainConfig, run_dir: Path | None = None) -> dict:
    """`fitnets train`: the student through the schedule's stages, in run_dir (None: resume's)."""
    started = time.time()
    cfg, run_dir, state = prepare(cfg, run_dir)
    device = dist.pick_device(cfg.device)
    kinds, optim = cfg.schedule.stages, cfg.recipe.student
    shape, classes = cfg.dataset.in_shape, cfg.dataset.num_classes
    teacher, teacher_file, plans = None, None, []
    if set(kinds) & {"hint", "kd", "joint"}:
        teacher = build_network(cfg.teacher, shape, classes)
    if set(kinds) & {"hint", "joint"}:
        # Planned from the configs before the teacher is looked up (or trained), so a misspelt layer is
        # reported at once.
        plans = plan_hints(teacher, build_network(replace(cfg.student, weights=None), shape, classes),
                           cfg.hints.pairs, cfg.hints)
        console.print(plan_table(plans))
    if teacher is not None:
        if cfg.teacher.auto_train and not cfg.teacher.weights and not teacher_path(cfg).is_file():
            console.print(f"no teacher at {teacher_path(cfg)}: training it first (teacher.auto_train=true)")
            train_teacher(replace(cfg, resume=None), run_dir / "teacher", f"fitnets train resume={run_dir}",
                          continues=True)
        teacher_file = load_teacher(cfg, teacher)
        teacher = maybe_compile(teacher.to(device), cfg)
    made_by = provenance(cfg, teacher_file)   # taken at the start: the checkout may change during the run
    run = Run(cfg, optim, device, load_data(cfg.dataset, cfg.data, device, optim.augment), run_dir,
              tensorboard(run_dir, state))

    def build() -> Session:
        torch.manual_seed(cfg.seed)   # so every schedule with the same seed starts from the same student
        student = build_network(cfg.student, shape, classes, optim.init_range, optim.dropout_input, optim.dropout)
        return Session(maybe_compile(student.to(device), cfg), teacher, make_regressors(plans).to(device))

    s, result = fit(run, build, make_stages(kinds, plans), state, f"fitnets train resume={run_dir}")
    for guided, regressor in s.regressors.items():
        # Kept apart from the student (Algorithm 1 drops it), for inspection or reuse.
        atomic_write(run_dir / "checkpoints" / f"regressor-{guided}.pt",
                     lambda tmp: torch.save(regressor.state_dict(), tmp))
    return finish(run, s, result, "student", cfg.student.name, started, made_by)


def train_teacher(cfg: TeacherConfig, run_dir: Path | None = None, resume_command: str | None = None,
                  continues: bool = False) -> dict:
    """`fitnets train-teacher`: backprop with the paper's teacher recipe, saved to the teacher store, in run_dir
    (None: resume's). (Also called by `train` with teacher.auto_train, in the student's run directory, where it
    continues a teacher that was stopped.)"""
    started = time.time()
    cfg, run_dir, state = prepare(cfg, run_dir, continues)
    device = dist.pick_device(cfg.device)
    optim = cfg.recipe.teacher
    run = Run(cfg, optim, device, load_data(cfg.dataset, cfg.data, device, optim.augment), run_dir,
              tensorboard(run_dir, state))

    def build() -> Session:
        torch.manual_seed(cfg.seed)
        net = build_network(cfg.teacher, cfg.dataset.in_shape, cfg.dataset.num_classes, optim.init_range,
                            optim.dropout_input, optim.dropout)
        return Session(maybe_compile(net.to(device), cfg))

    made_by = provenance(cfg)   # taken at the start: the checkout may change while a long run trains
    s, result = fit(run, build, [Stage("ce")], state, resume_command or f"fitnets {cfg.command} resume={run_dir}")
    return finish(run, s, result, "teacher", cfg.teacher.name, started, made_by, store=teacher_path(cfg))


def maybe_compile(net, cfg: TeacherConfig):
    """With compile=true, torch.compile the network (every path through it: up to any tap, or all of it);
    before that, with channels_last=true, put its weights in channels_last memory format, which convolutions
    pass on to their outputs (and so to the regressors')."""
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    if cfg.compile:
        net.compile()
    return net


def teacher_path(cfg: TeacherConfig) -> Path:
    """Where `train` finds the teacher: teacher.checkpoint, else the store's <teacher>-<dataset>.pt."""
    return Path(cfg.teacher.checkpoint or Path(cfg.teacher_store) / f"{cfg.teacher.name}-{cfg.dataset.name}.pt")


def load_teacher(cfg: TeacherConfig, teacher) -> Path:
    """Load the teacher's trained weights into the network built from its config, from teacher.weights (a
    state_dict from anywhere, already loaded by build_network) or from a fitnets checkpoint that must hold
    the same network trained on the same dataset. Freeze it in eval mode; return the file it came from."""
    path = Path(cfg.teacher.weights) if cfg.teacher.weights else teacher_path(cfg)
    if not cfg.teacher.weights:
        if not path.is_file():
            raise ConfigError(f"no teacher checkpoint at {path}; train one with `fitnets train-teacher "
                              f"teacher={cfg.teacher.name} dataset={cfg.dataset.name}`, or pass "
                              "teacher.checkpoint=PATH (a fitnets checkpoint) or teacher.weights=PATH (a state_dict)")
        payload = load_payload(path)
        same = network_of(payload["network"]) == network_of(teacher.build_spec)
        if payload["dataset"]["name"] != cfg.dataset.name or not same:
            raise ConfigError(f"teacher checkpoint {path} holds a {payload['name']} trained on "
                              f"{payload['dataset']['name']} with another architecture or classes than "
                              f"teacher={cfg.teacher.name} dataset={cfg.dataset.name}; pass the matching teacher.checkpoint")
        teacher.load_state_dict(payload["state_dict"])
    teacher.eval().requires_grad_(False)
    return path
