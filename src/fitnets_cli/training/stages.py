"""What a stage is and what it computes: one batch's loss per stage kind, the teacher outputs it needs, the
modules it trains and its validation score.

Stage kinds (paper section 2):
  hint   student up to the guided tap + regressor, to predict the teacher's hint (Eq. 3)
  kd     the whole student, cross-entropy + lam * soft cross-entropy with the teacher at tau (Eq. 2)
  ce     the whole student (or teacher) by plain backprop
  joint  the whole student, cross-entropy + hint_weight * hint loss in one stage (not the paper's method)

Networks are reached only through the seam of networks/build.py (taps, the modules a tap depends on, constraints).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fitnets_cli.data.splits import Resident, batches
from fitnets_cli.runtime import dist
from fitnets_cli.training.evaluate import evaluate
from fitnets_cli.training.hints import HintPlan, key
from fitnets_cli.training.losses import hint_loss, kd_loss


@dataclass
class Stage:
    kind: str                                   # hint | kd | ce | joint
    plans: list[HintPlan] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"hint:{self.plans[0].guided}<-{self.plans[0].hint}" if self.kind == "hint" else self.kind


@dataclass
class Session:
    """What a run trains: `net` (the student; in train-teacher, the teacher), the frozen teacher (train's),
    the regressors (key(guided tap) -> regressor), and the optimiser of the stage in progress."""
    net: nn.Module
    teacher: nn.Module | None = None
    regressors: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    optimizer: torch.optim.Optimizer | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def train(self, mode: bool = True) -> None:
        """Switch the trained network and its regressors (batch norm, dropout) together."""
        self.net.train(mode)
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


def autocast(cfg, device: torch.device):
    """bf16 autocast (on CUDA or CPU) when `amp` is on."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)


def regress(s: Session, guided: str, x):
    """The regressor's prediction of the hint from the guided map (the map itself when shapes match)."""
    return s.regressors[key(guided)](x) if key(guided) in s.regressors else x


def teacher_layers(stage: Stage) -> list[str | None]:
    """The teacher outputs a stage needs: hint maps by tap name, None for the logits."""
    return {"hint": [p.hint for p in stage.plans[:1]], "kd": [None], "joint": [p.hint for p in stage.plans]}.get(stage.kind, [])


@torch.no_grad()
def teacher_cache(cfg, s: Session, stage: Stage, split, augmented: bool) -> dict | None:
    """The teacher's outputs on all of a resident split, computed once per stage, or None when they cannot be
    reused: caching is off, the inputs are augmented (the teacher must see each step's view) or streamed, or
    it is too big. Computed under the same autocast as live teacher passes, so results do not depend on
    whether it fits."""
    layers = teacher_layers(stage)
    if not (layers and cfg.teacher_cache and isinstance(split, Resident) and not augmented):
        return None
    n, device = len(split), split.device
    size = n * sum(math.prod(s.teacher.shapes[l] if l else (s.teacher.num_classes,)) for l in layers) * 4
    if size > cfg.teacher_cache_gb * 2**30:
        return None
    cache = {}
    for idx in batches(n, cfg.eval_batch_size, device, False):
        with autocast(cfg, device):
            outputs = s.teacher.taps(split.rows(idx), layers)   # resized as training batches are (dataset.resize)
        for layer, out in outputs.items():
            if layer not in cache:   # filled in place: no second copy while it is built
                cache[layer] = torch.empty((n, *out.shape[1:]), dtype=out.dtype, device=out.device)
            cache[layer][idx] = out
    return cache


def batch_targets(s: Session, stage: Stage, x, cache: dict | None, idx) -> dict:
    """The teacher outputs for one batch: rows of the cache, or a live teacher pass as deep as needed."""
    if cache is not None:
        return {l: t[idx] for l, t in cache.items()}
    layers = teacher_layers(stage)
    with torch.no_grad():
        return s.teacher.taps(x, layers) if layers else {}


def stage_loss(cfg, s: Session, stage: Stage, x, y, lam: float, targets: dict):
    """(loss, {term: value}, logits or None) of one batch; `targets` holds the teacher's outputs."""
    if stage.kind == "hint":
        plan = stage.plans[0]
        guided = s.net.taps(x, [plan.guided])[plan.guided]
        loss = cfg.schedule.hint_weight * hint_loss(targets[plan.hint], regress(s, plan.guided, guided),
                                                    cfg.hints.reduction)
        return loss, {"hint": loss}, None
    if stage.kind == "kd":
        logits, kd = s.net(x), cfg.recipe.kd
        loss, ce, soft = kd_loss(logits, targets[None], y, kd.tau, lam, kd.form, kd.ce_weight)
        return loss, {"ce": ce, "kd": soft}, logits
    if stage.kind == "ce":
        logits = s.net(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"ce": loss}, logits
    assert stage.kind == "joint", stage.kind
    out = s.net.taps(x, [p.guided for p in stage.plans] + [None])
    terms = {"ce": F.cross_entropy(out[None], y)}
    terms["hint"] = sum(hint_loss(targets[p.hint], regress(s, p.guided, out[p.guided]), cfg.hints.reduction)
                        for p in stage.plans)
    return terms["ce"] + cfg.schedule.hint_weight * terms["hint"], terms, out[None]


def trained_modules(s: Session, stage: Stage) -> list[nn.Module]:
    """Stage 1 trains what the guided tap depends on, and the regressor; the rest, all of the student."""
    regressors = [s.regressors[key(p.guided)] for p in stage.plans if key(p.guided) in s.regressors]
    if stage.kind == "hint":
        return s.net.depends(stage.plans[0].guided) + regressors
    return [s.net] + regressors


@torch.no_grad()
def evaluate_stage(cfg, s: Session, stage: Stage, split, cache: dict | None = None) -> dict:
    """The validation metrics of a stage: hint loss for hint stages, else loss, accuracy and error."""
    if stage.kind != "hint":
        return evaluate(s.net, split, cfg.eval_batch_size)
    s.train(False)
    total = torch.zeros((), device=s.device)
    for x, y, idx, _ in split.batches(cfg.eval_batch_size):
        with autocast(cfg, s.device):
            targets = batch_targets(s, stage, x, cache, idx)
            total += stage_loss(cfg, s, stage, x, y, 0.0, targets)[0] * len(idx)
    s.train(True)
    return {"hint": dist.sum_(total).item() / len(split)}
