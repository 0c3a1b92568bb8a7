"""How the stages are trained: `fit` runs the phases and their stages, `train_stage` one stage's epochs with
validation and best-weights keeping, `train_epoch` its steps. Progress is saved as it goes (resume.py)."""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bars
from torch import nn

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Augment, Optim
from fitnets_cli.data.splits import Splits
from fitnets_cli.data.views import augment
from fitnets_cli.networks.build import constraints, restore_weights, snapshot_weights
from fitnets_cli.runtime import dist
from fitnets_cli.runtime.ui import console
from fitnets_cli.training import resume
from fitnets_cli.training.evaluate import evaluate
from fitnets_cli.training.resume import Interrupted, Progress
from fitnets_cli.training.schedules import lr_at, momentum_at
from fitnets_cli.training.stages import (Session, Stage, autocast, batch_targets, evaluate_stage, logged_weights,
                                         stage_loss, teacher_cache, trained_modules, validation_score, weights_at)


@dataclass
class Run:
    """What a run trains with: its config, the recipe of the network being trained, the device, the data, the
    run directory (None: keep no checkpoint) and the TensorBoard writer."""
    cfg: object
    optim: Optim
    device: torch.device
    data: Splits
    dir: Path | None
    tb: object


def fit(run: Run, build, stages: list[Stage], state: dict | None, resume_command: str) -> tuple[Session, dict]:
    """Train the stages with validation; with recipe.retrain_full, train them again from scratch on train +
    valid for the epoch counts validation chose (paper A.1.2). `build()` makes a freshly seeded session;
    `state` is a stopped run's saved state to continue from. Returns the session and the stages' results."""
    cfg, data = run.cfg, run.data
    phases = 2 if cfg.recipe.retrain_full and data.valid is not None else 1
    progress = Progress()
    bars = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=console, disable=not console.is_terminal)
    with resume.stop_on_signals(resume_command), resume.resumable_on_full_disk(resume_command), bars:
        while True:
            s, offset = build(), 0
            if state is not None:   # the stopped run's weights, RNG and progress, once
                progress, state = resume.restore(s, state), None
                offset = progress.step
            if dist.rank() > 0:
                # Built from the same seed as rank 0 (same weights); its dropout and augmentation draws differ.
                torch.manual_seed(cfg.seed * 1_000_003 + dist.rank() * 10_007 + offset)
            if progress.phase == 0:
                train, valid = data.train, data.valid
                epochs = [cfg.recipe.hint_epochs if st.guided and cfg.recipe.hint_epochs else run.optim.max_epochs
                          for st in stages]
            else:
                train, valid = data.train + data.valid, None
                epochs = [max(r["best_epoch"] + 1, 1) for r in progress.validated]
                console.print(f"retraining on train + valid for {epochs} epochs")
            for i in range(len(progress.results), len(stages)):
                progress.results.append(train_stage(run, s, stages[i], train, valid, epochs[i], progress, bars))
                resume.save(run, s, progress)   # the stage boundary
            if progress.phase + 1 == phases:
                break
            progress.phase, progress.validated, progress.results = 1, progress.results, []
    if phases == 1:
        return s, {"stages": progress.results}
    return s, {"stages": progress.validated, "retrain": progress.results}


def train_stage(run: Run, s: Session, stage: Stage, train, valid, max_epochs: int, progress: Progress,
                bars: Bars | None = None) -> dict:
    """Train one stage with early stopping on `valid` (if given), from where `progress` is; leave the best
    weights in place and return the stage's record. `bars`: the progress display (None: none)."""
    cfg, optim, name = run.cfg, run.optim, stage_name(progress, stage)
    bars = bars or Bars(disable=True)
    modules = trained_modules(s, stage)
    per_epoch = batches_per_epoch(len(train), optim, name)
    open_stage(run, s, stage, modules, progress, name)
    aug = augmentation(run)
    cache = teacher_cache(cfg, s, stage, train, aug.random)
    valid_cache = teacher_cache(cfg, s, stage, valid, False) if valid is not None and stage.guided else None
    if cache is not None:
        console.print(f"{name}: teacher outputs computed once for the {len(train)} training images "
                      "(no augmentation); no teacher pass in the training steps")
    stage_task = bars.add_task(name, total=max_epochs, completed=progress.epoch, status="")
    batch_task = bars.add_task("  epoch", total=per_epoch, status="")
    while progress.epoch < max_epochs:
        if progress.order is None:
            progress.order = dist.same_order(torch.randperm(len(train), device=run.device))
            if aug.resized_crop:   # drawn only where crops need it
                progress.seed = int(dist.same_order(torch.randint(2**62, (1,), device=run.device)).item())
        bars.reset(batch_task, completed=progress.batch)
        started = time.perf_counter()
        record = train_epoch(run, s, stage, modules, train, cache, progress, per_epoch, lambda: bars.advance(batch_task))
        record = close_epoch(run, s, stage, name, modules, record, started, min(per_epoch * optim.batch_size,
                             len(train)), valid, valid_cache, progress)
        status = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k.startswith(("train_", "valid_")))
        status += f" {record['images_s']:.0f} img/s, data wait {record['data_wait']:.0%}"
        bars.update(stage_task, advance=1, status=status)
        if not console.is_terminal:
            console.print(f"{name} epoch {progress.epoch}: {status}")
        stop = valid is not None and progress.epoch - progress.best["epoch"] >= optim.patience
        progress.next_epoch(run.device)
        if stop:
            break
        if progress.epoch < max_epochs:
            resume.save(run, s, progress)
    bars.remove_task(batch_task)
    bars.remove_task(stage_task)
    return close_stage(run, s, stage, name, modules, valid, progress)


def batches_per_epoch(n: int, optim: Optim, name: str) -> int:
    """How many steps an epoch of n training images takes; none is refused in one line."""
    per_epoch = n // optim.batch_size if optim.drop_last else math.ceil(n / optim.batch_size)
    if per_epoch == 0:
        raise ConfigError(f"stage {name}: drop_last=true with batch_size {optim.batch_size} leaves no batch of "
                          f"the {n} training images; lower the batch size or set drop_last=false")
    return per_epoch


def open_stage(run: Run, s: Session, stage: Stage, modules, progress: Progress, name: str) -> None:
    """The stage's optimiser over the modules it trains: fresh where the stage starts, else the stopped run's."""
    s.optimizer = make_optimizer(modules, list(s.regressors.values()) + list(s.terms.values()), run.optim)
    if progress.optimizer is None:
        progress.start_stage(run.device)
        progress.stages_started += 1
        run.tb.add_text("stages", f"stage {name} starts at epoch {progress.step}", progress.step)
    else:   # continuing a stopped run inside this stage
        s.optimizer.load_state_dict(progress.optimizer)
        progress.optimizer = None


def close_epoch(run: Run, s: Session, stage: Stage, name: str, modules, record: dict, started: float, seen: int,
                valid, valid_cache, progress: Progress) -> dict:
    """The epoch's record: training averages over the `seen` images, time and validation; the best weights so
    far kept; TensorBoard written. A loss that is no longer finite stops the run in one line."""
    record = {"epoch": progress.epoch, **record}
    record.update({f"train_{k}": dist.sum_(v).item() / seen for k, v in progress.sums.items()})   # syncs
    record["epoch_s"] = time.perf_counter() - started
    for k, v in record.items():
        if k.startswith("train_") and not math.isfinite(v):
            raise ConfigError(f"stage {name}, epoch {progress.epoch}: the {k[6:]} loss is {v}; the last good "
                              "checkpoint is kept; lower the LR (recipe.student.lr / recipe.teacher.lr) "
                              "or check the teacher checkpoint")
    if not stage.guided:
        record["train_acc"] = dist.sum_(torch.as_tensor(progress.correct, device=run.device)).item() / seen
    if valid is not None:
        record.update({f"valid_{k}": v for k, v in evaluate_stage(run.cfg, s, stage, valid, valid_cache,
                                                                  progress.epoch).items()})
        score = validation_score(stage, record, progress.epoch)
        if score < progress.best["score"]:
            progress.best = {"score": score, "epoch": progress.epoch, "state": snapshot_weights(modules)}
    progress.history.append(record)
    for k, v in record.items():
        if k != "epoch":
            run.tb.add_scalar(f"{name}/{k.replace('_', '/', 1)}", v, progress.step)
    run.tb.add_scalar("stage", progress.stages_started, progress.step)   # steps up at each stage boundary
    progress.step += 1
    return record


def close_stage(run: Run, s: Session, stage: Stage, name: str, modules, valid, progress: Progress) -> dict:
    """The stage's result: the last epoch's test score, taken before the best epoch's weights come back."""
    test = run.data.test
    test_last = evaluate(s.net, test, run.cfg.eval_batch_size) if test is not None and not stage.guided else None
    best = progress.best
    if best["state"] is not None:
        restore_weights(modules, best["state"])
    s.optimizer = None
    console.print(f"[bold]{name}[/]: {len(progress.history)} epochs" +
                  (f", best validation {'loss' if stage.guided else 'error'} "
                   f"{best['score']:.4g} at epoch {best['epoch']}" if valid is not None else ""))
    return {"name": name, "epochs": len(progress.history), "best_epoch": best["epoch"],
            "best_valid": best["score"] if valid is not None else None, "test_last": test_last,
            "history": progress.history}


def train_epoch(run: Run, s: Session, stage: Stage, modules, train, cache, progress: Progress, per_epoch: int,
                advance) -> dict:
    """Train one epoch from batch progress.batch, adding up its loss terms; after the step in which a signal
    arrived, save and raise Interrupted. Returns the epoch's lr (at its last update) and scheduled weights, the
    images trained per second and the share of that time spent waiting for data."""
    cfg, optim, opt = run.cfg, run.optim, s.optimizer
    aug = augmentation(run)
    params = [p for m in modules for p in m.parameters()]
    constrained = constraints(modules)
    weights = weights_at(stage, progress.epoch)
    lr = set_hyper(opt, optim, progress.epoch, progress.epoch * per_epoch + progress.batch)
    waited, images, started = [0.0], 0, time.perf_counter()
    batches = train.batches(optim.batch_size, progress.order, progress.batch, per_epoch,
                            crop_seed=progress.seed if aug.resized_crop else None, train=True)
    for b, (x, y, idx, size) in enumerate(timed(batches, waited), progress.batch):
        lr = set_hyper(opt, optim, progress.epoch, progress.epoch * per_epoch + b)
        if aug.pad or aug.flip:
            x = augment(x, aug.pad, aug.flip)
        with autocast(cfg, run.device):
            targets = batch_targets(s, stage, x, cache, idx)
            loss, terms, logits = stage_loss(s, stage, x, y, weights, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.reduce_gradients(params, len(idx) / size)
        opt.step()
        for module in constrained:
            module.constrain()
        for k, v in terms.items():   # summed on the device: one host sync per epoch, not per step
            progress.sums[k] = progress.sums.get(k, 0.0) + v.detach() * len(idx)
        if logits is not None:
            progress.correct += (logits.argmax(1) == y).sum()
        images += size
        advance()
        if dist.anyone(bool(resume.STOP)):   # every rank stops after the same step
            progress.batch = b + 1
            resume.save(run, s, progress, mid_epoch=True)
            raise Interrupted(f"stage {stage_name(progress, stage)}, epoch {progress.epoch}, batch {b + 1}")
    if run.device.type == "cuda":   # the steps run asynchronously: time them to their end
        torch.cuda.synchronize(run.device)
    spent = time.perf_counter() - started
    return {"lr": lr, **logged_weights(stage, weights), "images_s": images / spent,
            "data_wait": waited[0] / spent}


def augmentation(run: Run) -> Augment:
    """The augmentation of the network being trained: its recipe's, else the dataset's."""
    return run.optim.augment or run.cfg.dataset.augment


def stage_name(progress: Progress, stage: Stage) -> str:
    """The stage's name in logs and results; retrained stages are prefixed `retrain/`."""
    return ("retrain/" if progress.phase == 1 else "") + stage.name


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


def make_optimizer(modules: list[nn.Module], regressors, optim: Optim):
    """RMSProp, SGD or AdamW over the modules' parameters, the student's convolutions at conv_lr_scale x the LR
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
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def set_hyper(opt, optim: Optim, epoch: int, update: int) -> float:
    """Set the optimiser's LR and momentum for this update of the stage (schedules.lr_at, momentum_at); return
    the base LR."""
    lr, momentum = lr_at(optim, epoch, update), momentum_at(optim, epoch)
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]
        if optim.optimizer == "sgd":
            group["momentum"] = momentum
    return lr
