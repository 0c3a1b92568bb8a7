"""The hint plan: which teacher (hint) tap guides which student (guided) tap, through which regressor.

Regressors (hints.regressor):
  paper    a conv with no padding whose kernel is guided size - hint size + 1 (paper section 2.2), with the
           hint tap's non-linearity (a maxout conv with its pieces for the paper's teachers, as the authors'
           generateConvRegressor); none when the shapes are equal, as in the authors' code
  conv_bn  the CRD benchmark's ConvReg: conv + batch norm + ReLU; a stride-2 3x3 conv when the student's map
           is twice the teacher's, a stride-2 4x4 transposed conv when half, else a kernel from the shapes
  1x1      a 1x1 conv, for maps of the same size
  auto     any two maps: the guided map pooled or resized to the hint's size, then a 1x1 conv
Each is a builder of REGRESSORS, which plan() dispatches to after the checks they share.
"""

from dataclasses import dataclass

from rich.table import Table
from torch import nn

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Layer
from fitnets_cli.networks.maxout import MaxoutLayer, init_uniform
from fitnets_cli.networks.taps import check_tap


@dataclass
class HintPlan:
    hint: str
    guided: str
    hint_shape: tuple
    guided_shape: tuple
    regressor: str          # what joins them, in words; "none" when the guided map is compared directly
    make: object            # () -> the regressor module, or None


def default_tap(net) -> str:
    """The tap hints use when none is named: the network's own hint point where it names one (the zoo's
    feat[2]); else the middle stage of a timm model's feature_info (ResNet `layer2`, ConvNeXt `stages.2`,
    EfficientNet `blocks.2`, ViT `blocks.6` of 12); else the output of the second group of blocks where the
    network has groups (the CRD benchmark's habit: ResNet `layer2`); else the paper's middle layer: the middle
    one of the network's module-level taps that output a map."""
    if net.hint_point is not None:
        return net.hint_point
    if net.stages:
        return net.stages[len(net.stages) // 2]
    if len(net.groups) >= 2:
        return net.groups[1]
    maps = [t for t in net.blocks if len(net.shapes[t]) == 3]
    if not maps:
        raise ConfigError("the network has no tap that outputs a (C, H, W) map to give or take a hint; "
                          "name one in hints.pairs")
    return maps[(len(maps) - 1) // 2]


def named_pairs(teacher, student, pairs) -> list[tuple[str, str]]:
    """The pairs as (hint, guided) taps, a missing side taking its network's default, each checked to exist and
    each guided tap guided once; shallowest guided tap first."""
    if not pairs:
        raise ConfigError("hints.pairs is empty but a term reads the hint pairs; name at least one pair, or the "
                          "term's taps (student: [...], teacher: [...])")
    named = [(p.hint or default_tap(teacher), p.guided or default_tap(student)) for p in pairs]
    guided = [g for _, g in named]
    if len(set(guided)) != len(guided):
        raise ConfigError(f"hints.pairs guides a student layer twice ({', '.join(guided)}); one hint per guided layer")
    for hint, guided in named:
        check_tap(teacher, hint, "hint")
        check_tap(student, guided, "guided")
    order = list(student.shapes)
    return sorted(named, key=lambda p: order.index(p[1]))


def plan_hints(teacher, student, pairs, hints) -> list[HintPlan]:
    """Check every hint/guided pair and size its regressor; shallowest guided tap first."""
    return [plan(hint, guided, teacher, student.shapes[guided], hints)
            for hint, guided in named_pairs(teacher, student, pairs)]


@dataclass(frozen=True)
class Join:
    """What a regressor builder sees of one hint/guided pair: two (C, H, W) maps, the hint tap's teacher and the
    hints config; `where` names the pair in errors."""
    hint: str
    teacher: object
    hint_shape: tuple
    guided_shape: tuple
    hints: object
    where: str

    @property
    def kernel(self) -> tuple:
        """The unpadded conv kernel that maps the guided map's size onto the hint's (< 1 where it cannot)."""
        (_, t_h, t_w), (_, s_h, s_w) = self.hint_shape, self.guided_shape
        return s_h - t_h + 1, s_w - t_w + 1


def paper_regressor(j: Join):
    """paper: an unpadded conv of kernel guided - hint + 1 with the hint tap's non-linearity (maxout with its
    pieces), uniformly initialised; none for equal shapes, as the authors' code."""
    (t_c, _, _), (s_c, _, _), kernel, hints = j.hint_shape, j.guided_shape, j.kernel, j.hints
    if min(kernel) < 1:
        raise ConfigError(f"{j.where}: the teacher's map is larger than the student's, so no unpadded regressor "
                          "can join them; pick a deeper hint or a shallower guided layer, or hints.regressor=conv_bn")
    if j.hint_shape == j.guided_shape:   # as the authors' code: identical shapes need no regressor
        return "none (same shape)", None
    act, pieces = j.teacher.nonlinearity(j.hint)
    if act == "maxout" and kernel[0] != kernel[1]:
        raise ConfigError(f"{j.where}: the maxout regressor needs square maps on both sides")

    def make():
        if act == "maxout":
            spec = Layer(name="regressor", kind="conv", out=t_c, pieces=pieces, kernel=kernel[0],
                         max_norm=hints.regressor_max_norm)
            regressor = MaxoutLayer(spec, s_c)
        else:
            regressor = nn.Sequential(nn.Conv2d(s_c, t_c, kernel), *([nn.ReLU()] if act == "relu" else []))
        init_uniform(regressor, hints.regressor_init_range)
        return regressor
    return f"{kernel[0]}x{kernel[1]} conv" + (f", maxout x{pieces}" if act == "maxout" else f", {act}"), make


def conv_bn_regressor(j: Join):
    """conv_bn: the CRD benchmark's ConvReg, conv + BN + ReLU; the conv strides 2 where the student's map is twice
    the teacher's, is a stride-2 transposed conv where half, else unpadded with the kernel from the shapes."""
    (t_c, t_h, t_w), (s_c, s_h, s_w), kernel = j.hint_shape, j.guided_shape, j.kernel
    if s_h == 2 * t_h and s_w == 2 * t_w:
        conv, what = (lambda: nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)), "3x3 stride-2 conv"
    elif 2 * s_h == t_h and 2 * s_w == t_w:
        conv, what = (lambda: nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)), "4x4 stride-2 transposed conv"
    elif min(kernel) >= 1:
        conv, what = (lambda: nn.Conv2d(s_c, t_c, kernel)), f"{kernel[0]}x{kernel[1]} conv"
    else:
        raise ConfigError(f"{j.where}: no conv_bn regressor joins a student map smaller than the teacher's unless "
                          "it is exactly half; pick other layers")
    return what + " + BN + ReLU", lambda: nn.Sequential(conv(), nn.BatchNorm2d(t_c), nn.ReLU())


def one_by_one_regressor(j: Join):
    """1x1: a 1x1 conv, for maps of the same size."""
    (t_c, t_h, t_w), (s_c, s_h, s_w) = j.hint_shape, j.guided_shape
    if (s_h, s_w) != (t_h, t_w):
        raise ConfigError(f"{j.where}: hints.regressor=1x1 needs maps of the same size; use conv_bn or paper")
    return "1x1 conv", lambda: nn.Conv2d(s_c, t_c, 1)


def auto_regressor(j: Join):
    """auto: any two maps, whatever their sizes (a CNN's and a transformer's patch grid): the guided map
    average-pooled (where the hint's size divides it) or bilinearly resized to the hint's size, then a 1x1 conv
    with the hint tap's ReLU where it has one; none for equal shapes."""
    if j.hint_shape == j.guided_shape:
        return "none (same shape)", None
    (t_c, t_h, t_w), (s_c, s_h, s_w) = j.hint_shape, j.guided_shape
    act = j.teacher.nonlinearity(j.hint)[0]
    shrink = t_h <= s_h and t_w <= s_w and s_h % t_h == 0 and s_w % t_w == 0
    resize = "" if (s_h, s_w) == (t_h, t_w) else "average-pooled to " if shrink else "bilinear resize to "
    what = (f"{resize}{t_h}x{t_w}, " if resize else "") + "1x1 conv" + (", relu" if act == "relu" else "")

    def make():
        sized = [] if not resize else [nn.AdaptiveAvgPool2d((t_h, t_w)) if shrink else
                                       nn.Upsample(size=(t_h, t_w), mode="bilinear", align_corners=False)]
        return nn.Sequential(*sized, nn.Conv2d(s_c, t_c, 1), *([nn.ReLU()] if act == "relu" else []))
    return what, make


# hints.regressor -> its builder: Join -> (the regressor in words, a () -> nn.Module or None for none), or a
# ConfigError where it cannot join the two maps. (config/groups.py's Hints checks the names.)
REGRESSORS = {"paper": paper_regressor, "conv_bn": conv_bn_regressor, "1x1": one_by_one_regressor,
              "auto": auto_regressor}


def plan(hint: str, guided: str, teacher, guided_shape: tuple, hints) -> HintPlan:
    """The regressor that maps the guided tap's output onto the hint's, or a one-line error naming both."""
    hint_shape = teacher.shapes[hint]
    where = f"hint {hint} {fmt(hint_shape)} <- guided {guided} {fmt(guided_shape)}"
    if len(hint_shape) != 3 or len(guided_shape) != 3:
        raise ConfigError(f"{where}: regressors join (C, H, W) maps; pick conv taps on both sides")
    what, make = REGRESSORS[hints.regressor](Join(hint, teacher, hint_shape, guided_shape, hints, where))
    return HintPlan(hint, guided, hint_shape, guided_shape, what, make)


def key(tap: str) -> str:
    """A tap name as a ModuleDict key (which may not contain dots)."""
    return tap.replace(".", ":")


def regressor_params(p: HintPlan) -> int:
    """The regressor's parameter count (0 without one)."""
    return sum(t.numel() for t in p.make().parameters()) if p.make else 0


def plan_table(plans: list[HintPlan]) -> Table:
    """The hint plan as a rich table, printed when a run starts."""
    table = Table(title="hint plan")
    for col in ("guided (student)", "shape", "hint (teacher)", "shape", "regressor", "regressor params"):
        table.add_column(col)
    for p in plans:
        table.add_row(p.guided, fmt(p.guided_shape), p.hint, fmt(p.hint_shape), p.regressor, f"{regressor_params(p):,}")
    return table


def fmt(shape) -> str:
    """A shape as HxWxC (maps) or units."""
    return "x".join(str(s) for s in (shape[1:] + shape[:1] if len(shape) == 3 else shape))
