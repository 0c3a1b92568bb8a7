"""Training: one loop that runs a list of stages over a student (hint, kd, ce, joint), or trains a teacher.

Stage kinds (paper section 2):
  hint   student up to the guided tap + regressor, to predict the teacher's hint (Eq. 3)
  kd     the whole student, cross-entropy + lam * soft cross-entropy with the teacher at tau (Eq. 2)
  ce     the whole student (or teacher) by plain backprop
  joint  the whole student, cross-entropy + hint_weight * hint loss in one stage (not the paper's method)

Networks are reached only through the seam in networks.py (taps, the modules a tap depends on, constraints).
"""

import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from fitnets_cli import dist
from fitnets_cli.checkpoint import DiskFull, atomic_write, holds, load_payload, save_model, write_json, write_text
from fitnets_cli.config import ConfigError, Config, Optim
from fitnets_cli.data import Resident, Splits, augment, batches, load_data
from fitnets_cli.evaluate import evaluate
from fitnets_cli.hints import HintPlan, key, make_regressors, plan_hints, plan_table
from fitnets_cli.losses import hint_loss, kd_loss, lam_at
from fitnets_cli.networks import build_network, constraints, count, network_of, restore_weights, snapshot_weights
from fitnets_cli.ui import console, errors


RESUME_FORMAT = "fitnets-resume-2"   # 2: best weights kept per trained module (the seam's depends)


@dataclass
class Stage:
    kind: str                                   # hint | kd | ce | joint
    plans: list[HintPlan] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"hint:{self.plans[0].guided}<-{self.plans[0].hint}" if self.kind == "hint" else self.kind


@dataclass
class Session:
    """What the stages of one run share. `student` is the network being trained (in train-teacher, the teacher)."""
    student: nn.Module
    teacher: nn.Module | None
    regressors: nn.ModuleDict                   # key(guided tap) -> regressor
    cfg: Config
    optim: Optim
    device: torch.device
    tb: SummaryWriter
    test: object = None                         # the test split, scored at each stage's last epoch
    step: int = 0                               # epochs run so far over all stages: the TensorBoard x axis
    stages_started: int = 0
    checkpoint: object = None                   # checkpoint(at): save progress, `at` a position in a stage
    prefix: str = ""                            # "retrain/" while retraining on train + valid

    def train(self, mode: bool = True) -> None:
        """Switch the student and its regressors (batch norm, dropout) together."""
        self.student.train(mode)
        self.regressors.train(mode)


def make_stages(kinds: list[str], plans: list[HintPlan]) -> list[Stage]:
    """Expand the schedule's stage kinds: one hint stage per hint pair; joint takes every pair at once."""
    stages = []
    for kind in kinds:
        if kind == "hint":
            stages += [Stage("hint", [plan]) for plan in plans]
        else:
            stages.append(Stage(kind, plans if kind == "joint" else []))
    return stages


def autocast(s: Session):
    """bf16 autocast (on CUDA or CPU) when `amp` is on."""
    return torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.cfg.amp)


def maybe_compile(net, cfg: Config):
    """With compile=true, torch.compile the network (every path through it: up to any tap, or all of it);
    before that, with channels_last=true, put its weights in channels_last memory format, which convolutions
    pass on to their outputs (and so to the regressors')."""
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    if cfg.compile:
        net.compile()
    return net


# ---------------------------------------------------------------- one step's loss, per stage kind

def regress(s: Session, guided: str, x):
    """The regressor's prediction of the hint from the guided map (the map itself when shapes match)."""
    return s.regressors[key(guided)](x) if key(guided) in s.regressors else x


def teacher_layers(stage: Stage) -> list[str | None]:
    """The teacher outputs a stage needs: hint maps by tap name, None for the logits."""
    return {"hint": [p.hint for p in stage.plans[:1]], "kd": [None], "joint": [p.hint for p in stage.plans]}.get(stage.kind, [])


@torch.no_grad()
def teacher_cache(s: Session, stage: Stage, split, which: str) -> dict | None:
    """The teacher's outputs on all of a resident split, computed once per stage, or None when they cannot be
    reused: caching is off, the inputs are augmented (the teacher must see each step's view) or streamed, or
    it is too big. Computed under the same autocast as live teacher passes, so results do not depend on
    whether it fits."""
    layers = teacher_layers(stage)
    aug = s.optim.augment or s.cfg.dataset.augment
    augmented = which == "train" and (aug.pad or aug.flip or aug.resized_crop)
    if not (layers and s.cfg.teacher_cache and isinstance(split, Resident) and not augmented):
        return None
    x = split.x
    size = len(x) * sum(math.prod(s.teacher.shapes[l] if l else (s.teacher.num_classes,)) for l in layers) * 4
    if size > s.cfg.teacher_cache_gb * 2**30:
        return None
    cache = {}
    for idx in batches(len(x), s.cfg.eval_batch_size, x.device, False):
        with autocast(s):
            outputs = s.teacher.taps(x[idx], layers)
        for layer, out in outputs.items():
            if layer not in cache:   # filled in place: no second copy while it is built
                cache[layer] = torch.empty((len(x), *out.shape[1:]), dtype=out.dtype, device=out.device)
            cache[layer][idx] = out
    return cache


def stage_loss(s: Session, stage: Stage, x, y, lam: float, targets: dict):
    """(loss, {term: value}, logits or None) of one batch; `targets` holds the teacher's outputs."""
    hints, kd = s.cfg.hints, s.cfg.recipe.kd
    if stage.kind == "hint":
        plan = stage.plans[0]
        guided = s.student.taps(x, [plan.guided])[plan.guided]
        loss = s.cfg.schedule.hint_weight * hint_loss(targets[plan.hint], regress(s, plan.guided, guided),
                                                      hints.reduction)
        return loss, {"hint": loss}, None
    if stage.kind == "kd":
        logits = s.student(x)
        loss, ce, soft = kd_loss(logits, targets[None], y, kd.tau, lam, kd.form, kd.ce_weight)
        return loss, {"ce": ce, "kd": soft}, logits
    if stage.kind == "ce":
        logits = s.student(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"ce": loss}, logits
    assert stage.kind == "joint", stage.kind
    out = s.student.taps(x, [p.guided for p in stage.plans] + [None])
    terms = {"ce": F.cross_entropy(out[None], y)}
    terms["hint"] = sum(hint_loss(targets[p.hint], regress(s, p.guided, out[p.guided]), hints.reduction)
                        for p in stage.plans)
    return terms["ce"] + s.cfg.schedule.hint_weight * terms["hint"], terms, out[None]


def batch_targets(s: Session, stage: Stage, x, cache: dict | None, idx) -> dict:
    """The teacher outputs for one batch: rows of the cache, or a live teacher pass as deep as needed."""
    if cache is not None:
        return {l: t[idx] for l, t in cache.items()}
    layers = teacher_layers(stage)
    with torch.no_grad():
        return s.teacher.taps(x, layers) if layers else {}


def trained_modules(s: Session, stage: Stage) -> list[nn.Module]:
    """Stage 1 trains what the guided tap depends on, and the regressor; the rest, all of the student."""
    regressors = [s.regressors[key(p.guided)] for p in stage.plans if key(p.guided) in s.regressors]
    if stage.kind == "hint":
        return s.student.depends(stage.plans[0].guided) + regressors
    return [s.student] + regressors


def make_optimizer(modules: list[nn.Module], regressors, optim: Optim):
    """RMSProp or SGD over the modules' parameters, the student's convolutions at conv_lr_scale x the LR
    (the authors' W_lr_scale); regressors keep the base LR."""
    conv, rest, seen = [], [], set()
    for top in modules:
        for module in top.modules():
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    scaled = isinstance(module, nn.Conv2d) and not any(top is r for r in regressors)
                    (conv if scaled else rest).append(p)
    groups = [{"params": conv, "lr": optim.lr * optim.conv_lr_scale, "lr_scale": optim.conv_lr_scale},
              {"params": rest, "lr": optim.lr, "lr_scale": 1.0}]
    groups = [g for g in groups if g["params"]]
    if optim.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=optim.lr, alpha=optim.rms_decay, eps=optim.rms_eps,
                                   weight_decay=optim.weight_decay)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def set_hyper(opt, optim: Optim, epoch: int, update: int) -> float:
    """Apply the LR (scaled to the batch; linear decay and steps by epoch, exponential decay by update) and the
    momentum ramp at this update of the stage; return the base LR."""
    ramp = lambda saturate: min(epoch / saturate, 1.0) if saturate > 0 else 0.0
    lr = optim.lr * (1 - (1 - optim.lr_decay_factor) * ramp(optim.lr_decay_saturate))
    if optim.lr_batch:   # the linear scaling rule: the LR is given for lr_batch images
        lr *= optim.batch_size / optim.lr_batch
    lr *= optim.lr_step_factor ** sum(epoch >= step for step in optim.lr_steps)
    if optim.lr_exp_decay != 1:
        lr = max(lr / optim.lr_exp_decay ** update, optim.lr_min)
    momentum = optim.momentum + (optim.momentum_final - optim.momentum) * ramp(optim.momentum_saturate)
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]
        if optim.optimizer == "sgd":
            group["momentum"] = momentum
    return lr


@torch.no_grad()
def evaluate_stage(s: Session, stage: Stage, split, cache: dict | None = None) -> dict:
    """The validation metrics of a stage: hint loss for hint stages, else loss, accuracy and error."""
    if stage.kind == "hint":
        s.train(False)
        total = torch.zeros((), device=s.device)
        for x, y, idx, _ in split.batches(s.cfg.eval_batch_size):
            with autocast(s):
                targets = batch_targets(s, stage, x, cache, idx)
                total += stage_loss(s, stage, x, y, 0.0, targets)[0] * len(idx)
        s.train(True)
        return {"hint": dist.sum_(total).item() / len(split)}
    return evaluate(s.student, split, s.cfg.eval_batch_size)


# ---------------------------------------------------------------- the loop

@dataclass
class Epoch:
    """Where a stage is: the epoch, the first batch still to run, the order of this epoch's images and the seed
    of their random-resized crops, the running sums of the loss terms and correct predictions, and the history
    and best epoch so far."""
    epoch: int = 0
    batch: int = 0
    order: torch.Tensor | None = None
    seed: int = 0
    sums: dict = field(default_factory=dict)
    correct: torch.Tensor | float = 0.0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"score": math.inf, "epoch": -1, "state": None})


def timed(batches, waited: list):
    """The batches, adding the seconds spent waiting for each (for data, not for the device) to waited[0]."""
    batches = iter(batches)
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        waited[0] += time.perf_counter() - started
        if batch is None:
            return
        yield batch


def train_epoch(s: Session, stage: Stage, opt, modules, train, cache, at: Epoch, per_epoch: int, progress, task):
    """Train one epoch (from batch at.batch), adding up its loss terms; checkpoint and raise Interrupted
    after the step in which a signal arrived. Returns the epoch's lr (at its last update) and lam, the images
    trained per second and the share of that time spent waiting for data."""
    optim, kd = s.optim, s.cfg.recipe.kd
    aug = optim.augment or s.cfg.dataset.augment
    params = [p for m in modules for p in m.parameters()]
    constrained = constraints(modules)
    lam = lam_at(at.epoch, kd) if stage.kind == "kd" else 0.0
    lr = set_hyper(opt, optim, at.epoch, at.epoch * per_epoch + at.batch)
    waited, images, started = [0.0], 0, time.perf_counter()
    batches = train.batches(optim.batch_size, at.order, at.batch, per_epoch,
                            crop_seed=at.seed if aug.resized_crop else None, train=True)
    for b, (x, y, idx, size) in enumerate(timed(batches, waited), at.batch):
        lr = set_hyper(opt, optim, at.epoch, at.epoch * per_epoch + b)
        if aug.pad or aug.flip:
            x = augment(x, aug.pad, aug.flip)
        with autocast(s):
            targets = batch_targets(s, stage, x, cache, idx)
            loss, terms, logits = stage_loss(s, stage, x, y, lam, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.reduce_gradients(params, len(idx) / size)
        opt.step()
        for module in constrained:
            module.constrain()
        for k, v in terms.items():   # summed on the device: one host sync per epoch, not per step
            at.sums[k] = at.sums.get(k, 0.0) + v.detach() * len(idx)
        if logits is not None:
            at.correct += (logits.argmax(1) == y).sum()
        images += size
        progress.advance(task)
        if dist.anyone(bool(STOP)):   # every rank stops after the same step
            at.batch = b + 1
            s.checkpoint(position(opt, at, reduce=True))
            raise Interrupted(f"stage {stage_name(s, stage)}, epoch {at.epoch}, batch {b + 1}")
    if s.device.type == "cuda":   # the steps run asynchronously: time them to their end
        torch.cuda.synchronize(s.device)
    spent = time.perf_counter() - started
    return {"lr": lr, **({"lam": lam} if stage.kind == "kd" else {}), "images_s": images / spent,
            "data_wait": waited[0] / spent}


def position(opt, at: Epoch, reduce: bool = False) -> dict:
    """A checkpointable position in a stage; with `reduce`, the running sums are summed over ranks first."""
    sums = {k: dist.sum_(v) for k, v in at.sums.items()} if reduce else at.sums
    return {"optimizer": opt.state_dict(), "history": at.history, "best": at.best, "epoch": at.epoch,
            "batch": at.batch, "order": at.order, "seed": at.seed, "sums": sums,
            "correct": dist.sum_(at.correct) if reduce and torch.is_tensor(at.correct) else at.correct}


def end_epoch(s: Session, stage: Stage, at: Epoch, record: dict, started: float, seen: int, valid, valid_cache,
              modules) -> dict:
    """The end-of-epoch bookkeeping: the epoch's record (training averages, time, validation), best-weights
    keeping and TensorBoard. Returns the record."""
    name = stage_name(s, stage)
    record = {"epoch": at.epoch, **record}
    record.update({f"train_{k}": dist.sum_(v).item() / seen for k, v in at.sums.items()})   # syncs
    record["epoch_s"] = time.perf_counter() - started
    for k, v in record.items():
        if k.startswith("train_") and not math.isfinite(v):
            raise ConfigError(f"stage {name}, epoch {at.epoch}: the {k[6:]} loss is {v}; the last good "
                              "checkpoint is kept; lower the LR (recipe.student.lr / recipe.teacher.lr) "
                              "or check the teacher checkpoint")
    if stage.kind != "hint":
        record["train_acc"] = dist.sum_(torch.as_tensor(at.correct, device=s.device)).item() / seen
    if valid is not None:
        record.update({f"valid_{k}": v for k, v in evaluate_stage(s, stage, valid, valid_cache).items()})
        score = record["valid_hint"] if stage.kind == "hint" else record["valid_error"]
        if score < at.best["score"]:
            at.best = {"score": score, "epoch": at.epoch, "state": snapshot_weights(modules)}
    at.history.append(record)
    for k, v in record.items():
        if k != "epoch":
            s.tb.add_scalar(f"{name}/{k.replace('_', '/', 1)}", v, s.step)
    s.tb.add_scalar("stage", s.stages_started, s.step)   # steps up at each stage boundary
    s.step += 1
    return record


def stage_name(s: Session, stage: Stage) -> str:
    return s.prefix + stage.name


def run_stage(s: Session, stage: Stage, train, valid, max_epochs: int, progress, at: dict | None = None) -> dict:
    """Train one stage with early stopping on `valid` (if given); leave the best weights in place.
    `at` is a checkpointed position inside this stage to continue from."""
    optim, name = s.optim, stage_name(s, stage)
    modules = trained_modules(s, stage)
    opt = make_optimizer(modules, list(s.regressors.values()), optim)
    n = len(train)
    per_epoch = n // optim.batch_size if optim.drop_last else math.ceil(n / optim.batch_size)
    if per_epoch == 0:
        raise ConfigError(f"stage {name}: drop_last=true with batch_size {optim.batch_size} leaves no batch of "
                          f"the {n} training images; lower the batch size or set drop_last=false")
    seen = min(per_epoch * optim.batch_size, n)   # images trained on per epoch
    where = Epoch(correct=torch.zeros((), device=s.device))
    if at is not None:
        opt.load_state_dict(at["optimizer"])
        # The saved sums are over all ranks (see position): rank 0 carries them on, the others restart.
        keep = dist.is_main()
        where = Epoch(at["epoch"], at["batch"], None if at["order"] is None else at["order"].to(s.device),
                      at.get("seed", 0), {k: v.to(s.device) * keep for k, v in at["sums"].items()},
                      torch.as_tensor(at["correct"], device=s.device) * keep, at["history"], at["best"])
    cache = teacher_cache(s, stage, train, "train")
    valid_cache = teacher_cache(s, stage, valid, "valid") if valid is not None and stage.kind == "hint" else None
    if cache is not None:
        console.print(f"{name}: teacher outputs computed once for the {n} training images "
                      "(no augmentation); no teacher pass in the training steps")
    stage_task = progress.add_task(name, total=max_epochs, completed=where.epoch, status="")
    batch_task = progress.add_task("  epoch", total=per_epoch, status="")
    if at is None:
        s.stages_started += 1
        s.tb.add_text("stages", f"stage {name} starts at epoch {s.step}", s.step)
    while where.epoch < max_epochs:
        if where.order is None:
            where.order = dist.same_order(torch.randperm(n, device=s.device))
            if (optim.augment or s.cfg.dataset.augment).resized_crop:   # drawn only where crops need it
                where.seed = int(dist.same_order(torch.randint(2**62, (1,), device=s.device)).item())
        progress.reset(batch_task, completed=where.batch)
        started = time.perf_counter()
        record = train_epoch(s, stage, opt, modules, train, cache, where, per_epoch, progress, batch_task)
        record = end_epoch(s, stage, where, record, started, seen, valid, valid_cache, modules)
        status = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k.startswith(("train_", "valid_")))
        status += f" {record['images_s']:.0f} img/s, data wait {record['data_wait']:.0%}"
        progress.update(stage_task, advance=1, status=status)
        if not console.is_terminal:
            console.print(f"{name} epoch {where.epoch}: {status}")
        stop = valid is not None and where.epoch - where.best["epoch"] >= optim.patience
        where = Epoch(where.epoch + 1, correct=torch.zeros((), device=s.device), history=where.history,
                      best=where.best)
        if stop:
            break
        if where.epoch < max_epochs:
            s.checkpoint(position(opt, where))
    # The last epoch's test score, taken before the best epoch's weights come back.
    test_last = evaluate(s.student, s.test, s.cfg.eval_batch_size) if s.test is not None and stage.kind != "hint" \
        else None
    if where.best["state"] is not None:
        restore_weights(modules, where.best["state"])
    progress.remove_task(batch_task)
    progress.remove_task(stage_task)
    best = where.best
    result = {"name": name, "epochs": len(where.history), "best_epoch": best["epoch"],
              "best_valid": best["score"] if valid is not None else None, "test_last": test_last,
              "history": where.history}
    console.print(f"[bold]{name}[/]: {len(where.history)} epochs" +
                  (f", best validation {'hint loss' if stage.kind == 'hint' else 'error'} "
                   f"{best['score']:.4g} at epoch {best['epoch']}" if valid is not None else ""))
    return result


def run_stages(s: Session, stages: list[Stage], train, valid, epochs=None, prefix="", state: dict | None = None,
               checkpoint=None) -> list[dict]:
    """Run the stages in order, from where `state` left off; `epochs` fixes each stage's length
    (retraining without validation). `checkpoint(results, at)` saves progress."""
    results = list(state["results"]) if state else []
    s.checkpoint = lambda at: checkpoint(results, at) if checkpoint else None
    s.prefix = prefix
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                        console=console, disable=not console.is_terminal)
    with progress:
        for i in range(len(results), len(stages)):
            at = state["at"] if state and i == state["stage"] else None
            hint_epochs = s.cfg.recipe.hint_epochs if stages[i].kind == "hint" else None
            results.append(run_stage(s, stages[i], train, valid, epochs[i] if epochs else hint_epochs or
                                     s.optim.max_epochs, progress, at))
            s.checkpoint(None)   # the stage boundary
    return results


# ---------------------------------------------------------------- commands

def teacher_path(cfg: Config) -> Path:
    """Where `train` finds the teacher: teacher.checkpoint, else the store's <teacher>-<dataset>.pt."""
    return Path(cfg.teacher.checkpoint or Path(cfg.teacher_store) / f"{cfg.teacher.name}-{cfg.dataset.name}.pt")


def load_teacher(cfg: Config, teacher) -> Path:
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


def fit(cfg: Config, build, stages: list[Stage], data: Splits, run_dir: Path, state: dict | None = None,
        resume_command: str | None = None):
    """Run the stages with validation; with recipe.retrain_full, rerun them from scratch on train + valid
    for the epoch counts that validation chose (paper A.1.2). Progress is checkpointed at every epoch (and
    on SIGINT/SIGTERM after the current step) to <run_dir>/checkpoints/last.pt; `state` resumes from it."""
    path = run_dir / "checkpoints" / "last.pt"
    retrain = cfg.recipe.retrain_full and data.valid is not None

    def session(phase_state):
        s = build()
        s.test = data.test
        if phase_state:
            restore(s, phase_state)
        if dist.rank() > 0:
            # Built from the same seed as rank 0 (same weights); its dropout and augmentation draws differ.
            torch.manual_seed(cfg.seed * 1_000_003 + dist.rank() * 10_007 + s.step)
        return s

    def saver(s, phase, first=None):
        return lambda results, at: save_state(path, s, phase=phase, stage=len(results), results=results,
                                              first=first, at=at)

    resume_command = resume_command or f"fitnets {cfg.command} resume={run_dir}"
    with stop_on_signals(resume_command), resumable_on_full_disk(resume_command):
        phase = state["phase"] if state else 0
        if phase == 0:
            s = session(state)
            result = {"stages": run_stages(s, stages, data.train, data.valid, state=state, checkpoint=saver(s, 0))}
            state, step = None, s.step
        else:
            result, step = {"stages": state["first"]}, None   # the saved state restores the step
        if retrain:
            epochs = [max(r["best_epoch"] + 1, 1) for r in result["stages"]]
            console.print(f"retraining on train + valid for {epochs} epochs")
            full = data.train + data.valid
            s = session(state)
            if state is None:
                s.step = step
            result["retrain"] = run_stages(s, stages, full, None, epochs, "retrain/", state,
                                           saver(s, 1, result["stages"]))
    return s, result


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step; its checkpoint is written."""


STOP = []   # the signals received; checked after every training step


@contextmanager
def stop_on_signals(resume_command: str):
    """While training, SIGINT and SIGTERM ask the loop to stop after the current step (and checkpoint)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.clear()
    def on_signal(signum, frame):
        STOP.append(signum)
        signal.signal(signum, signal.SIG_DFL)   # a second one stops at once

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Interrupted as where:
        by = signal.Signals(STOP[0]).name if STOP else "a signal to another rank"
        raise Interrupted(f"{by} at {where}; checkpoint saved. Resume with: "
                          f"{resume_command}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def resumable_on_full_disk(resume_command: str):
    """A checkpoint that found the disk full left the previous one intact: say how to continue from it."""
    try:
        yield
    except DiskFull as full:
        raise DiskFull(f"{full}; once there is room, continue the run with: {resume_command}") from None


def save_state(path: Path, s: Session, **position) -> None:
    """Everything needed to continue exactly here: weights, optimiser, early stopping, RNG states."""
    state = {"format": RESUME_FORMAT, "student": s.student.state_dict(), "regressors": s.regressors.state_dict(),
             "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "step": s.step, "stages_started": s.stages_started, **position}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    s.tb.flush()   # the logged epochs survive a SIGKILL along with the checkpoint


def restore(s: Session, state: dict) -> None:
    """Put a freshly built session back where `state` was saved."""
    s.student.load_state_dict(state["student"])
    s.regressors.load_state_dict(state["regressors"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    s.step, s.stages_started = state["step"], state["stages_started"]


def load_state(run_dir: Path) -> dict | None:
    """The resumable state of a run directory, or None if it has none."""
    path = run_dir / "checkpoints" / "last.pt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"the resume checkpoint {path} is corrupted ({str(err).splitlines()[0][:100]}); "
                          "it cannot be resumed") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ConfigError(f"{path} is not a resume checkpoint of this fitnets version ({RESUME_FORMAT}); "
                          "finish it with the version that started it")
    return state


def provenance(cfg: Config, teacher_file: Path | None = None) -> dict:
    """What made a model: package versions, the code's git commit, the teacher file's hash, the split seed."""
    here = Path(__file__).resolve().parent
    try:
        top, commit = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=here, capture_output=True,
                                     text=True, timeout=10).stdout.split() or (None, None)
    except (OSError, subprocess.SubprocessError, ValueError):
        top, commit = None, None
    if top is None or Path(top) / "src" / "fitnets_cli" != here:
        commit = None   # installed outside a fitnets checkout: no commit to record
    teacher_sha = hashlib.sha256(teacher_file.read_bytes()).hexdigest() if teacher_file else None
    packages = ("fitnets-cli", "torch", "torchvision", "hydra-core", "omegaconf")
    return {"versions": {p: installed_version(p) for p in packages}
            | {"python": platform.python_version()},
            "git_commit": commit, "teacher_sha256": teacher_sha, "split_seed": cfg.data.split_seed, "seed": cfg.seed}


def installed_version(package: str) -> str | None:
    """The package's installed version; None when it runs from a source tree that was never installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def finish(cfg: Config, s: Session, result: dict, data: Splits, role: str, name: str, started: float,
           run_dir: Path, made_by: dict, store: Path | None = None):
    """Test the final model, save it, write metrics.json (last: it marks the run finished) and TensorBoard
    hparams, and print the summary."""
    net = s.student
    test = evaluate(net, data.test, cfg.eval_batch_size)
    last_stage = (result.get("retrain") or result["stages"])[-1]
    sizes = count(network_of(net.build_spec), net.in_shape, net.num_classes, cfg.counting)
    metrics = {
        "command": cfg.command, "role": role, "model": name, "dataset": cfg.dataset.name,
        "teacher": cfg.teacher.name if cfg.teacher else None,
        "schedule": "teacher" if role == "teacher" else cfg.schedule.name, "seed": cfg.seed,
        "counting": cfg.counting, **sizes, "test": test, "test_last": last_stage["test_last"] or test,
        "device": str(s.device), "provenance": made_by,
        "wall_s": round(time.time() - started, 1), **result,
    }
    skipped = sorted(set().union(*(getattr(split, "skipped", ()) for split in (data.train, data.valid, data.test))))
    if skipped:   # data.bad_images=skip
        metrics["skipped_images"] = skipped
        console.print(f"{len(skipped)} image(s) failed to decode and were left out (data.bad_images=skip): "
                      f"{', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}")
    for path in [run_dir / "checkpoints" / f"{role}.pt"] + ([store] if store else []):
        save_model(path, net, role=role, name=name, dataset=cfg.dataset,
                   config=(run_dir / "config_resolved.yaml").read_text(), metrics=test, provenance=made_by)
    if store:
        console.print(f"teacher stored at {store}")
    write_json(run_dir / "metrics.json", metrics)
    dist.barrier()   # an auto-trained teacher is read back by every rank once rank 0 has stored it
    s.tb.add_hparams({"model": name, "dataset": cfg.dataset.name, "schedule": metrics["schedule"],
                      "seed": cfg.seed, "lr": s.optim.lr, "batch_size": s.optim.batch_size},
                     {"hparam/test_acc": test["acc"], "hparam/test_loss": test["loss"]}, run_name=".")
    s.tb.close()
    table = Table(title=f"{role} {name} on {cfg.dataset.name}")
    for col in ("stage", "epochs", "best epoch", "best valid"):
        table.add_column(col)
    for r in result["stages"] + result.get("retrain", []):
        table.add_row(r["name"], str(r["epochs"]), str(r["best_epoch"]),
                      "" if r["best_valid"] is None else f"{r['best_valid']:.4g}")
    console.print(table)
    console.print(f"test accuracy {test['acc']:.2%} (error {test['error']:.2%}, loss {test['loss']:.4f}); "
                  f"{sizes['params']:,} params, {sizes['mults']:,} mults; run dir {run_dir}")
    return metrics


class Unlogged:
    """The TensorBoard writer of torchrun's ranks other than 0: it writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def tensorboard(run_dir: Path, state: dict | None) -> SummaryWriter:
    """The run's TensorBoard writer; on resume, points logged after the checkpoint are dropped."""
    if not dist.is_main():
        return Unlogged()
    return SummaryWriter(run_dir / "tb", purge_step=state["step"] if state else None)


class AlreadyFinished(Exception):
    """resume= named a finished run: nothing to do."""


def network_lrs(cfg: Config) -> Config:
    """The config with the LR that recipe.lr_by_network gives the teacher or the student it names."""
    lrs = cfg.recipe.lr_by_network if cfg.recipe else {}
    for role in ("teacher", "student"):
        net = getattr(cfg, role)
        if net is not None and net.name in lrs:
            optim = replace(getattr(cfg.recipe, role), lr=lrs[net.name])
            cfg = replace(cfg, recipe=replace(cfg.recipe, **{role: optim}))
    return cfg


def prepare(cfg: Config, run_dir: Path | None = None) -> tuple[Config, Path, dict | None]:
    """The run's config, directory and resumable state: with resume=DIR, the saved config and state of DIR.
    A `run_dir` passed in is an auto-trained teacher's, which continues where its student's run stopped.
    The LRs of recipe.lr_by_network are applied here, so that the run's saved config shows what trained."""
    cfg = network_lrs(cfg)
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved = run_dir / "config_resolved.yaml"
        if not saved.exists():
            raise ConfigError(f"resume={run_dir}: no config_resolved.yaml there; is it a fitnets run directory?")
        resumed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved)))
        if resumed.command != cfg.command:
            raise ConfigError(f"{run_dir} is a `fitnets {resumed.command}` run; resume it with "
                              f"`fitnets {resumed.command} resume={run_dir}`")
        if (run_dir / "metrics.json").exists():
            acc = json.loads((run_dir / "metrics.json").read_text())["test"]["acc"]
            raise AlreadyFinished(f"{run_dir} already finished (test accuracy {acc:.2%}); nothing to resume")
        cfg = resumed
        state = load_state(run_dir)
        console.print(f"resuming {run_dir} " + ("from its start (no checkpoint yet)" if state is None else
                      f"at stage {state['stage'] + 1} of phase {state['phase']}"))
    elif run_dir is not None:
        state = load_state(run_dir)
        write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    else:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if holds(run_dir):   # e.g. a reused sweep directory: never train over another run
            raise ConfigError(f"{run_dir} holds {holds(run_dir)}; resume it with `fitnets {cfg.command} "
                              f"resume={run_dir}` or choose another hydra.run.dir / hydra.sweep.dir")
        state = None
        write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic)
    return cfg, run_dir, state


def train_teacher(cfg: Config, run_dir: Path | None = None, resume_command: str | None = None) -> dict:
    """`fitnets train-teacher`: backprop with the paper's teacher recipe, saved to the teacher store.
    (Also called by `train` with teacher.auto_train, in the student's run directory.)"""
    started = time.time()
    cfg, run_dir, state = prepare(cfg, run_dir)
    device = dist.pick_device(cfg.device)
    optim = cfg.recipe.teacher
    data = load_data(cfg.dataset, cfg.data, device, optim.augment)
    tb = tensorboard(run_dir, state)

    def build():
        torch.manual_seed(cfg.seed)
        net = build_network(cfg.teacher, cfg.dataset.in_shape, cfg.dataset.num_classes, optim.init_range,
                            optim.dropout_input, optim.dropout).to(device)
        return Session(maybe_compile(net, cfg), None, nn.ModuleDict(), cfg, optim, device, tb)

    made_by = provenance(cfg)   # taken at the start: the checkout may change while a long run trains
    s, result = fit(cfg, build, [Stage("ce")], data, run_dir, state, resume_command)
    return finish(cfg, s, result, data, "teacher", cfg.teacher.name, started, run_dir, made_by,
                  store=teacher_path(cfg))


def train_student(cfg: Config) -> dict:
    """`fitnets train`: the student through the schedule's stages."""
    started = time.time()
    cfg, run_dir, state = prepare(cfg)
    device = dist.pick_device(cfg.device)
    kinds = cfg.schedule.stages
    optim = cfg.recipe.student
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
            train_teacher(replace(cfg, resume=None), run_dir / "teacher", f"fitnets train resume={run_dir}")
        teacher_file = load_teacher(cfg, teacher)
        teacher = maybe_compile(teacher.to(device), cfg)
    data = load_data(cfg.dataset, cfg.data, device, optim.augment)
    tb = tensorboard(run_dir, state)

    def build():
        # Seeded here, so every schedule with the same seed starts from the same student.
        torch.manual_seed(cfg.seed)
        student = build_network(cfg.student, shape, classes, optim.init_range, optim.dropout_input,
                                optim.dropout).to(device)
        return Session(maybe_compile(student, cfg), teacher, make_regressors(plans).to(device), cfg, optim,
                       device, tb)

    made_by = provenance(cfg, teacher_file)   # taken at the start: the checkout may change during the run
    s, result = fit(cfg, build, make_stages(kinds, plans), data, run_dir, state)
    for guided, regressor in s.regressors.items():
        # Kept apart from the student (Algorithm 1 drops it), for inspection or reuse.
        atomic_write(run_dir / "checkpoints" / f"regressor-{guided}.pt",
                     lambda tmp: torch.save(regressor.state_dict(), tmp))
    return finish(cfg, s, result, data, "student", cfg.student.name, started, run_dir, made_by)


def command(cfg: Config):
    """`fitnets train` and `fitnets train-teacher`, with what an interrupted or finished run prints."""
    try:
        return (train_student if cfg.command == "train" else train_teacher)(cfg)
    except AlreadyFinished as done:
        console.print(str(done))
    except Interrupted as stopped:
        errors.print(f"stopped by {escape(str(stopped))}")
        sys.exit(128 + (STOP or [signal.SIGTERM])[0])   # empty: another torchrun rank was signalled
