"""What a stage is and what it computes. A stage (schedule.stages, as data) trains the whole student, the student
up to the taps its terms read (`guided`, the paper's stage 1, with their regressors) or named modules, and its
loss is a weighted sum of terms (terms.py); this module plans the stages from the config, and computes a batch's
loss, the teacher outputs it needs, the modules it trains and its validation score.

Networks are reached only through the seam of networks/build.py (taps, the modules a tap depends on, constraints).
"""

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from rich.table import Table
from torch import nn

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import TermSpec
from fitnets_cli.data.splits import Resident, batches
from fitnets_cli.runtime import dist
from fitnets_cli.training.evaluate import evaluate
from fitnets_cli.training.hints import key
from fitnets_cli.training.terms import TERMS, Term, added, ce, make_module, pairs_of, plan_term, try_term


@dataclass
class Stage:
    name: str
    terms: list[Term]
    train: str = "student"                  # student | guided | modules
    modules: list[str] = field(default_factory=list)

    @property
    def guided(self) -> bool:
        """Whether it trains the student up to its taps (validated on its loss, with no accuracy)."""
        return self.train == "guided"

    @cached_property
    def plans(self) -> list:
        return [p for t in self.terms for p in t.plans]

    @cached_property   # read every step; fixed once the stage is planned
    def student_taps(self) -> list:
        return list(dict.fromkeys(t for term in self.terms for t in term.student))

    @cached_property
    def teacher_taps(self) -> list:
        """The teacher outputs the stage needs: taps by name, None for the logits."""
        return list(dict.fromkeys(t for term in self.terms for t in term.teacher))

    def describe(self) -> str:
        """What it trains, in words."""
        what = "the student up to " + ", ".join(self.student_taps) if self.guided else \
            "modules " + ", ".join(self.modules) if self.modules else "the student"
        return what + (" + regressors" if any(p.make for p in self.plans) else "")


def stage_table(stages: list[Stage]) -> Table:
    """The planned stages as a rich table, printed when a run starts: what each trains, its terms and weights."""
    table = Table(title="stages")
    for col in ("stage", "trains", "loss: weight x term(student taps | teacher taps)"):
        table.add_column(col)
    for stage in stages:
        table.add_row(stage.name, stage.describe(), " + ".join(t.describe() for t in stage.terms))
    return table


def backprop_stage() -> Stage:
    """The one stage of train-teacher: cross-entropy, all of the network."""
    return Stage("ce", [Term("ce", (1.0, 1.0, 0, 0), False, [None], [], ce)])


def reads_pairs(spec: TermSpec) -> bool:
    """Whether a configured term takes the hint pairs for its taps (it names none on a side that reads pairs)."""
    pairs = TERMS[spec.term][1] == "pairs" if spec.term else True
    return pairs and (spec.student is None or spec.teacher is None)


def plan_stages(cfg, teacher, student) -> list[Stage]:
    """The schedule's stages with their terms planned and tried on random inputs of the planned shapes; a
    per_pair stage becomes one stage per hint pair, shallowest guided tap first."""
    pairs, stages = None, []
    for spec in cfg.schedule.stages:
        if pairs is None and (spec.per_pair or any(reads_pairs(t) for t in spec.terms)):
            pairs = pairs_of(cfg.hints, teacher, student)
        for group in ([[p] for p in pairs] if spec.per_pair else [pairs or []]):
            name = f"{spec.name}:{group[0][1]}<-{group[0][0]}" if spec.per_pair else spec.name
            terms = [plan_term(t, group, cfg, teacher, student, f"stage {name}") for t in spec.terms]
            stage = Stage(name, terms, spec.train, list(spec.modules))
            check_stage(stage, student)
            for term in terms:
                term.key = f"stage{len(stages)}-{term.name}"
                try_term(term, teacher, student, f"stage {name}")
            stages.append(stage)
    return stages


def check_stage(stage: Stage, student) -> None:
    """A guided stage reads student taps and no student logits; a modules stage names modules that exist."""
    if stage.guided and (None in stage.student_taps or not stage.student_taps):
        raise ConfigError(f"stage {stage.name}: train=guided trains the student up to the taps its terms read, "
                          "but a term reads the student's logits (or none reads a tap); use train=student")
    for prefix in stage.modules:
        student.submodules(prefix)   # a one-line error naming the closest modules when there are none


@dataclass
class Session:
    """What a run trains: `net` (the student; in train-teacher, the teacher), the frozen teacher (train's),
    the regressors (key(guided tap) -> regressor, shared by the stages that use the pair), the terms' own
    modules (Term.key -> module) and the optimiser of the stage in progress."""
    net: nn.Module
    teacher: nn.Module | None = None
    regressors: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    terms: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    optimizer: torch.optim.Optimizer | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def train(self, mode: bool = True) -> None:
        """Switch the trained network, its regressors and the terms' modules (batch norm, dropout) together."""
        self.net.train(mode)
        self.regressors.train(mode)
        self.terms.train(mode)


def session(net, teacher, stages: list[Stage], device) -> Session:
    """A session of freshly made regressors (one per guided tap of the stages' pairs, in stage order) and term
    modules, on the device."""
    regressors = nn.ModuleDict()
    for p in (p for stage in stages for p in stage.plans):
        if p.make and key(p.guided) not in regressors:
            regressors[key(p.guided)] = p.make()
    terms = nn.ModuleDict({t.key: make_module(t, teacher, net) for stage in stages for t in stage.terms if t.module})
    return Session(net, teacher, regressors.to(device), terms.to(device))


def autocast(cfg, device: torch.device):
    """bf16 autocast (on CUDA or CPU) when `amp` is on."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)


@torch.no_grad()
def teacher_cache(cfg, s: Session, stage: Stage, split, augmented: bool) -> dict | None:
    """The teacher's outputs on all of a resident split, computed once per stage, or None when they cannot be
    reused: caching is off, the inputs are augmented (the teacher must see each step's view) or streamed, or
    it is too big. Computed under the same autocast as live teacher passes, so results do not depend on
    whether it fits."""
    layers = stage.teacher_taps
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
    layers = stage.teacher_taps
    with torch.no_grad():
        return s.teacher.taps(x, layers) if layers else {}


def term_value(s: Session, term: Term, student: list, teacher: list, y):
    """One term on one batch: the hint term through its pairs' regressors, a module term through its module."""
    if term.plans:
        regressors = [s.regressors[key(p.guided)] if key(p.guided) in s.regressors else None for p in term.plans]
        return term.fn(student, teacher, y, regressors=regressors, **term.kwargs)
    if term.module:
        return s.terms[term.key](student, teacher, y).reshape(())
    value = term.fn(student, teacher, y, **term.kwargs)
    return value.reshape(()) if value.dim() else value


def stage_loss(s: Session, stage: Stage, x, y, weights: list[float], targets: dict):
    """(loss, {term: value}, logits or None) of one batch: the terms' sum at these weights; `targets` holds the
    teacher's outputs."""
    taps = stage.student_taps
    out = {None: s.net(x)} if taps == [None] else s.net.taps(x, taps)
    values = {t.name: term_value(s, t, [out[n] for n in t.student], [targets[n] for n in t.teacher], y)
              for t in stage.terms}
    loss = added(w * values[t.name] for t, w in zip(stage.terms, weights))
    return loss, values, out.get(None)


def weights_at(stage: Stage, epoch: int) -> list[float]:
    """Each term's weight at this (0-based) epoch of the stage."""
    return [t.weight_at(epoch) for t in stage.terms]


def logged_weights(stage: Stage, weights: list[float]) -> dict:
    """The scheduled weights as the epoch records them: `lam` (the paper's name for the annealed KD weight) where
    one term is scheduled, else lam_<term> for each."""
    scheduled = [(t.name, w) for t, w in zip(stage.terms, weights) if t.scheduled]
    return {"lam": scheduled[0][1]} if len(scheduled) == 1 else {f"lam_{n}": w for n, w in scheduled}


def trained_modules(s: Session, stage: Stage) -> list[nn.Module]:
    """What the stage trains (the student, the part of it its taps depend on, or named modules), its pairs'
    regressors and its terms' modules, each once."""
    if stage.guided:
        part = [m for tap in stage.student_taps for m in s.net.depends(tap)]
    elif stage.modules:
        part = [m for prefix in stage.modules for m in s.net.submodules(prefix)]
    else:
        part = [s.net]
    regressors = [s.regressors[key(p.guided)] for p in stage.plans if key(p.guided) in s.regressors]
    own = [s.terms[t.key] for t in stage.terms if t.module]
    return list({id(m): m for m in part + regressors + own}.values())


@torch.no_grad()
def evaluate_stage(cfg, s: Session, stage: Stage, split, cache: dict | None = None, epoch: int = 0) -> dict:
    """The validation metrics of a stage: for a guided stage each term's mean, else loss, accuracy and error."""
    if not stage.guided:
        return evaluate(s.net, split, cfg.eval_batch_size)
    s.train(False)
    totals = {t.name: torch.zeros((), device=s.device) for t in stage.terms}
    weights = weights_at(stage, epoch)
    for x, y, idx, _ in split.batches(cfg.eval_batch_size):
        with autocast(cfg, s.device):
            targets = batch_targets(s, stage, x, cache, idx)
            values = stage_loss(s, stage, x, y, weights, targets)[1]
        for name, v in values.items():
            totals[name] += v * len(idx)
    s.train(True)
    return {name: dist.sum_(v).item() / len(split) for name, v in totals.items()}


def validation_score(stage: Stage, record: dict, epoch: int) -> float:
    """What early stopping minimises: a guided stage's weighted validation loss, else the validation error."""
    if not stage.guided:
        return record["valid_error"]
    return added(w * record[f"valid_{t.name}"] for t, w in zip(stage.terms, weights_at(stage, epoch)))
