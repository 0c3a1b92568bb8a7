"""Loss terms, what a stage's loss is a weighted sum of, and their plan: the taps each reads, its weight over the
stage and, for a term of your own, its parameters. Every term has one signature:

    term(student: list[Tensor], teacher: list[Tensor], labels: Tensor, **kwargs) -> scalar Tensor

student and teacher hold the outputs of the taps it names (`logits`: the network's output), in that order; a
map is (N, C, H, W), a vector (N, D). A term of your own is a dotted path (`_target_`) to such a function, or to
an nn.Module class built as Cls(student_shapes, teacher_shapes, **kwargs) (per-example shapes, e.g. [(16, 7, 7)],
raising ValueError for shapes it cannot take) and called as module(student, teacher, labels); its parameters
train with the student and are saved beside it. Each term is tried on random inputs of the planned shapes
before anything runs, so a term that refuses them or returns no finite scalar stops the run in one line.
"""

import importlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fitnets_cli.config.errors import ConfigError, one_line
from fitnets_cli.config.groups import HintPair, TermSpec
from fitnets_cli.networks.taps import check_tap
from fitnets_cli.training.hints import fmt, named_pairs, plan_hints
from fitnets_cli.training.losses import at_loss, dkd_loss, hint_loss, kd_soft, pkt_loss, sp_loss

LOGITS = "logits"   # the tap name of a network's output; None inside `taps`


def added(values):
    """The sum of the values, starting from the first (no 0 + ..., so one value is returned as it is)."""
    total = None
    for v in values:
        total = v if total is None else total + v
    return total


def ce(student, teacher, labels):
    """Cross-entropy of the student's logits with the labels."""
    return F.cross_entropy(student[0].float(), labels)


def kd(student, teacher, labels, tau: float = 3.0, form: str = "paper"):
    """The paper's soft cross-entropy with the teacher at tau (Eq. 2), or Hinton's tau^2 KL (form=hinton)."""
    return kd_soft(student[0], teacher[0], tau, form)


def hint(student, teacher, labels, regressors=(), reduction: str = "code"):
    """Eq. 3 over the pairs: each guided map through its regressor (None: as it is) against its hint."""
    return added(hint_loss(t, r(s) if r is not None else s, reduction) for s, t, r in zip(student, teacher, regressors))


def at(student, teacher, labels, p: float = 2):
    """Attention transfer, summed over the pairs (RepDistiller sums its groups' losses)."""
    return added(at_loss(s, t, p) for s, t in zip(student, teacher))


def sp(student, teacher, labels):
    """Similarity-preserving KD, summed over the pairs."""
    return added(sp_loss(s, t) for s, t in zip(student, teacher))


def pkt(student, teacher, labels):
    """Probabilistic knowledge transfer, summed over the pairs."""
    return added(pkt_loss(s, t) for s, t in zip(student, teacher))


def dkd(student, teacher, labels, alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0):
    """Decoupled KD of the student's logits from the teacher's."""
    return dkd_loss(student[0], teacher[0], labels, alpha, beta, tau)


# term -> (function, what it reads by default: "logits" (the student's, and the teacher's unless it reads no
# teacher) or "pairs" (hints.pairs' guided and hint taps), whether it reads the teacher).
TERMS = {"ce": (ce, "logits", False), "kd": (kd, "logits", True), "dkd": (dkd, "logits", True),
         "hint": (hint, "pairs", True), "at": (at, "pairs", True), "sp": (sp, "pairs", True),
         "pkt": (pkt, "pairs", True)}


@dataclass
class Term:
    """A planned term: its weight over the stage (start, end, first and last epoch; `scheduled` when it follows
    a ramp, and is logged), the taps it reads (None: the logits), what computes it, and, for the hint term, the
    plans of its pairs' regressors."""
    name: str
    weight: tuple
    scheduled: bool
    student: list
    teacher: list
    fn: object                      # the function, or your nn.Module class (made per session, in Session.terms)
    kwargs: dict = field(default_factory=dict)
    plans: list = field(default_factory=list)
    module: bool = False
    key: str = ""                   # a module term's key in Session.terms (set when its stage is planned)

    def weight_at(self, epoch: int) -> float:
        """The weight at this (0-based) epoch of the stage: start until `first`, then linear to end at `last`."""
        start, end, first, last = self.weight
        if epoch <= first:
            return start
        if epoch >= last:
            return end
        t = (epoch - first) / (last - first)
        return start + (end - start) * t

    def describe(self) -> str:
        """The term in words: weight, name, taps."""
        start, end, first, last = self.weight
        weight = f"{start:g}" if start == end else f"{start:g}->{end:g} (epochs {first}-{last})"
        taps = lambda names: ",".join(LOGITS if n is None else n for n in names)
        return f"{weight} x {self.name}({taps(self.student)}" + (f" | {taps(self.teacher)})" if self.teacher else ")")


def needs_teacher(schedule) -> bool:
    """Whether any term of the schedule reads the teacher (so that it must be built and trained)."""
    return any(reads_teacher(t) for stage in schedule.stages for t in stage.terms)


def reads_teacher(spec: TermSpec) -> bool:
    """Whether a configured term reads any teacher output: the taps it names, else its kind's default."""
    if spec.teacher is not None:
        return bool(spec.teacher)
    return TERMS[spec.term][2] if spec.term else True


def pairs_of(hints, teacher, student) -> list[tuple[str, str]]:
    """hints.pairs as (hint, guided) taps (hints.named_pairs), which only a run with a teacher has."""
    if teacher is None:
        raise ConfigError("a term reads the hint pairs' taps but none reads the teacher; name the term's taps "
                          "(student: [...], teacher: [])")
    return named_pairs(teacher, student, hints.pairs)


def plan_term(spec: TermSpec, pairs, cfg, teacher, student, where: str) -> Term:
    """A term of a stage: its taps resolved (pairs: the stage's hint pairs), checked to exist, and its weight
    (unset: 1, kd's the recipe's lam, hint's schedule.hint_weight); the hint term's regressors planned."""
    hints, kd = cfg.hints, cfg.recipe.kd
    fn, reads, reads_t = TERMS[spec.term] if spec.term else (resolve(spec._target_, where), "pairs", True)
    default_s = [None] if reads == "logits" else [g for _, g in pairs]
    default_t = ([None] if reads_t else []) if reads == "logits" else [h for h, _ in pairs]
    taps = {"student": spec.student if spec.student is not None else default_s,
            "teacher": spec.teacher if spec.teacher is not None else default_t}
    for role, net in (("student", student), ("teacher", teacher)):
        taps[role] = [None if t in (LOGITS, None) else t for t in taps[role]]
        for t in taps[role]:
            if t is not None:
                check_tap(net, t, f"{where}: term {spec.name}'s {role}")
    kwargs = dict(spec.kwargs)
    if spec.term == "kd":   # the paper's term: tau, form and lam from recipe.kd unless the term sets them
        kwargs = {"tau": kd.tau, "form": kd.form, **kwargs}
    if spec.weight is not None:
        weight = (spec.weight, spec.weight if spec.weight_end is None else spec.weight_end, *spec.ramp)
    elif spec.term == "kd":
        weight = (kd.lam_start, kd.lam_end, kd.lam_start_epoch, kd.lam_end_epoch)
    else:
        w = cfg.schedule.hint_weight if spec.term == "hint" else 1.0
        weight = (w, w, 0, 0)
    scheduled = spec.weight_end is not None or (spec.weight is None and spec.term == "kd")
    term = Term(spec.name, weight, scheduled, taps["student"], taps["teacher"], fn, kwargs, module=inspect.isclass(fn))
    if spec.term == "hint":
        if not term.student or len(term.student) != len(term.teacher) or None in term.student + term.teacher:
            raise ConfigError(f"{where}: term hint joins maps in pairs; give as many student as teacher taps, "
                              "none of them logits")
        term.plans = plan_hints(teacher, student, [HintPair(h, g) for h, g in zip(term.teacher, term.student)], hints)
        by_guided = {p.guided: p for p in term.plans}
        term.plans = [by_guided[g] for g in term.student]   # the term's own order, which its inputs follow
        term.kwargs = {"reduction": hints.reduction, **kwargs}
    return term


def resolve(path: str, where: str):
    """Your term's function or nn.Module class, by dotted path."""
    module_name, _, attr = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{where}: term _target_={path} cannot be imported ({one_line(err)}); give a dotted path "
                          "module.function on PYTHONPATH") from None
    if not callable(found) or (inspect.isclass(found) and not issubclass(found, nn.Module)):
        raise ConfigError(f"{where}: term _target_={path} is a {type(found).__name__}, not a function or an "
                          "nn.Module class; point it at def term(student, teacher, labels, **kwargs)")
    return found


def shapes(net, taps) -> list[tuple]:
    """The per-example output shapes of a network's taps (None: the logits)."""
    return [(net.num_classes,) if t is None else tuple(net.shapes[t]) for t in taps]


def make_module(term: Term, teacher, student) -> nn.Module:
    """Your nn.Module term, built for the shapes it reads."""
    return term.fn(shapes(student, term.student), shapes(teacher, term.teacher) if term.teacher else [],
                   **term.kwargs)


def try_term(term: Term, teacher, student, where: str) -> None:
    """Call the term once on random inputs of its planned shapes (batch 4), without touching the RNG: a term that
    refuses the shapes, or returns anything but a finite scalar, is a one-line error naming them."""
    s_shapes = shapes(student, term.student)
    t_shapes = shapes(teacher, term.teacher) if term.teacher else []
    said = f"{where}: term {term.name} on student {', '.join(map(fmt, s_shapes)) or '-'} / teacher " \
           f"{', '.join(map(fmt, t_shapes)) or '-'}"
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        labels = torch.arange(4) % student.num_classes
        s_in, t_in = ([torch.randn(4, *sh) for sh in group] for group in (s_shapes, t_shapes))
        try:
            if term.plans:
                regressors = [p.make() if p.make else None for p in term.plans]
                value = term.fn(s_in, t_in, labels, regressors=regressors, **term.kwargs)
            elif term.module:
                value = make_module(term, teacher, student)(s_in, t_in, labels)
            else:
                value = term.fn(s_in, t_in, labels, **term.kwargs)
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"{said}: it failed ({type(err).__name__}: {one_line(err)}); read taps of shapes it "
                              "takes (`fitnets layers`), or fix the term") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(f"{said}: it returned {got}; a term returns a scalar tensor (reduce it, e.g. .mean())")
    if not torch.isfinite(value).all():
        raise ConfigError(f"{said}: it returned {value.item()} on random inputs; a term must be finite (guard its "
                          "divisions and logs)")
