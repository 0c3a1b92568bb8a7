"""`fitnets train` and `fitnets train-teacher`: a run's networks (built once), data and stages, handed to the loop
(loop.fit), and what the run leaves behind (rundir.finish)."""

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from fitnets_cli.config.commands import TrainConfig, TrainingConfig
from fitnets_cli.config.errors import ConfigError
from fitnets_cli.data.load import load_data
from fitnets_cli.networks.build import build_network, network_of
from fitnets_cli.networks.checkpoint import load_payload
from fitnets_cli.runtime import dist
from fitnets_cli.runtime.files import atomic_write
from fitnets_cli.runtime.ui import console
from fitnets_cli.training.hints import plan_table
from fitnets_cli.training.loop import Run, fit
from fitnets_cli.training.rundir import finish, prepare, provenance, tensorboard
from fitnets_cli.training.stages import Session, Stage, backprop_stage, plan_stages, session, stage_table
from fitnets_cli.training.terms import needs_teacher


@dataclass
class Built:
    """A network built once from the run's seed, with what puts it back as built: its first weights and the RNG
    state that building left, so a phase that trains from scratch (retrain_full) needs no second build."""
    net: nn.Module
    seed: int
    rng: torch.Tensor
    weights: dict
    started: bool = False

    def start(self) -> nn.Module:
        """The network as built, and the RNG where building it from the seed left it."""
        if self.started:
            self.net.load_state_dict(self.weights)
        self.started = True
        torch.manual_seed(self.seed)   # CUDA's generators too, which a build on the CPU leaves as seeded
        torch.set_rng_state(self.rng)
        return self.net


@dataclass
class Networks:
    """A run's networks, each built and traced once from the configs, and its planned stages, made before any
    teacher is looked up or trained (so a misspelt layer or a term that refuses its inputs is reported at once)."""
    trained: Built                      # the network the command trains: the student, or train-teacher's teacher
    teacher: Built | None = None        # train's frozen teacher, before its trained weights are loaded
    stages: list[Stage] = field(default_factory=list)


def build(spec, cfg: TrainingConfig, optim) -> Built:
    """A network of the run, built from its seed with its recipe's initialisation and dropout."""
    torch.manual_seed(cfg.seed)   # so every schedule with the same seed starts from the same network
    net = build_network(spec, cfg.dataset.in_shape, cfg.dataset.num_classes, optim.init_range, optim.dropout_input,
                        optim.dropout)
    return Built(net, cfg.seed, torch.get_rng_state(), copy.deepcopy(net.state_dict()))


def networks(cfg: TrainingConfig) -> Networks:
    """The networks of a `train` or `train-teacher` config and the schedule's planned stages. The teacher is built
    (where a term reads it) as train-teacher builds it, so that teacher.auto_train can train this very network."""
    teacher = None
    if cfg.command == "train-teacher" or needs_teacher(cfg.schedule):
        teacher = build(cfg.teacher, cfg, cfg.recipe.teacher)
    if cfg.command == "train-teacher":
        return Networks(teacher)
    student = build(cfg.student, cfg, cfg.recipe.student)
    return Networks(student, teacher, plan_stages(cfg, teacher and teacher.net, student.net))


def train_student(cfg: TrainConfig, run_dir: Path | None = None, built: Networks | None = None) -> dict:
    """`fitnets train`: the student through the schedule's stages, in run_dir (None: resume's); `built`: the
    config's networks (None: built here)."""
    started = time.time()
    cfg, run_dir, state = prepare(cfg, run_dir)
    built = networks(cfg) if built is None or cfg.resume else built   # a resumed run's config is its saved one
    device = dist.pick_device(cfg.device)
    optim = cfg.recipe.student
    console.print(stage_table(built.stages))
    plans = [p for stage in built.stages for p in stage.plans]
    if plans:
        console.print(plan_table(list({p.guided: p for p in plans}.values())))
    teacher, teacher_file = None, None
    if built.teacher is not None:
        if cfg.teacher.auto_train and not cfg.teacher.weights and not teacher_path(cfg).is_file():
            console.print(f"no teacher at {teacher_path(cfg)}: training it first (teacher.auto_train=true)")
            train_teacher(replace(cfg, resume=None), run_dir / "teacher", f"fitnets train resume={run_dir}",
                          continues=True, built=Networks(built.teacher))
        teacher_file = load_teacher(cfg, built.teacher.net)
        teacher = maybe_compile(built.teacher.net.to(device), cfg)
    made_by = provenance(cfg, teacher_file)   # taken at the start: the checkout may change during the run
    run = Run(cfg, optim, device, load_data(cfg.dataset, cfg.data, device, optim.augment), run_dir,
              tensorboard(run_dir, state))
    student = maybe_compile(built.trained.net.to(device), cfg)

    def start() -> Session:
        built.trained.start()
        return session(student, teacher, built.stages, device)

    s, result = fit(run, start, built.stages, state, f"fitnets train resume={run_dir}")
    # Kept apart from the student (Algorithm 1 drops the regressors), for inspection or reuse.
    for name, module in [(f"regressor-{k}", m) for k, m in s.regressors.items()] + \
                        [(f"term-{k}", m) for k, m in s.terms.items()]:
        atomic_write(run_dir / "checkpoints" / f"{name}.pt", lambda tmp: torch.save(module.state_dict(), tmp))
    return finish(run, s, result, "student", cfg.student.name, started, made_by)


def train_teacher(cfg: TrainingConfig, run_dir: Path | None = None, resume_command: str | None = None,
                  continues: bool = False, built: Networks | None = None) -> dict:
    """`fitnets train-teacher`: backprop with the paper's teacher recipe, saved to the teacher store, in run_dir
    (None: resume's); `built`: the teacher as `networks` built it (None: built here). (Also called by `train`
    with teacher.auto_train, in the student's run directory, where it continues a teacher that was stopped.)"""
    started = time.time()
    cfg, run_dir, state = prepare(cfg, run_dir, continues)
    teacher = build(cfg.teacher, cfg, cfg.recipe.teacher) if built is None or cfg.resume else built.trained
    device = dist.pick_device(cfg.device)
    optim = cfg.recipe.teacher
    run = Run(cfg, optim, device, load_data(cfg.dataset, cfg.data, device, optim.augment), run_dir,
              tensorboard(run_dir, state))
    net = maybe_compile(teacher.net.to(device), cfg)

    def start() -> Session:
        teacher.start()
        return Session(net)

    made_by = provenance(cfg)   # taken at the start: the checkout may change while a long run trains
    s, result = fit(run, start, [backprop_stage()], state, resume_command or f"fitnets {cfg.command} resume={run_dir}")
    return finish(run, s, result, "teacher", cfg.teacher.name, started, made_by, store=teacher_path(cfg))


def maybe_compile(net, cfg: TrainingConfig):
    """With compile=true, torch.compile the network (every path through it: up to any tap, or all of it);
    before that, with channels_last=true, put its weights in channels_last memory format, which convolutions
    pass on to their outputs (and so to the regressors')."""
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    if cfg.compile:
        net.compile()
    return net


def teacher_path(cfg: TrainingConfig) -> Path:
    """Where `train` finds the teacher: teacher.checkpoint, else the store's <teacher>-<dataset>.pt (with
    dataset.resize, <teacher>-<dataset>-<side>px.pt: a teacher of resized images is another teacher)."""
    size = f"-{cfg.dataset.resize}px" if cfg.dataset.resize else ""
    return Path(cfg.teacher.checkpoint or Path(cfg.teacher_store) / f"{cfg.teacher.name}-{cfg.dataset.name}{size}.pt")


def load_teacher(cfg: TrainingConfig, teacher) -> Path:
    """Load the teacher's trained weights into the network built from its config, from teacher.weights (a
    state_dict from anywhere, already loaded by build_network) or from a fitnets checkpoint that must hold
    the same network trained on the same dataset. Freeze it in eval mode; return the file it came from."""
    path = Path(cfg.teacher.weights) if cfg.teacher.weights else teacher_path(cfg)
    if not cfg.teacher.weights:
        if not path.is_file():
            raise ConfigError(f"no teacher checkpoint at {path}; train one with `fitnets train-teacher "
                              f"teacher={cfg.teacher.name} dataset={cfg.dataset.name}"
                              f"{f' dataset.resize={cfg.dataset.resize}' if cfg.dataset.resize else ''}`, or pass "
                              "teacher.checkpoint=PATH (a fitnets checkpoint) or teacher.weights=PATH (a state_dict)")
        payload = load_payload(path)
        same = network_of(payload["network"]) == network_of(teacher.build_spec) and \
            list(payload["in_shape"]) == list(teacher.in_shape)   # dataset.resize changes the input, not the name
        if payload["dataset"]["name"] != cfg.dataset.name or not same:
            raise ConfigError(f"teacher checkpoint {path} holds a {payload['name']} trained on "
                              f"{payload['dataset']['name']} {tuple(payload['in_shape'])} images with another "
                              f"architecture, input size or classes than teacher={cfg.teacher.name} "
                              f"dataset={cfg.dataset.name} {tuple(teacher.in_shape)}; pass the matching "
                              "teacher.checkpoint (or train one)")
        teacher.load_state_dict(payload["state_dict"])
    teacher.eval().requires_grad_(False)
    return path
