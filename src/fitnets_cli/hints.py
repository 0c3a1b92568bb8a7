"""The hint plan: which teacher (hint) layer guides which student (guided) layer, through which regressor."""

from dataclasses import dataclass

from rich.table import Table
from torch import nn

from fitnets_cli.config import ConfigError, Layer
from fitnets_cli.models import MaxoutLayer, Net, init_uniform


@dataclass
class HintPlan:
    hint: str
    guided: str
    hint_shape: tuple
    guided_shape: tuple
    kernel: tuple          # regressor kernel (kh, kw) = guided size - hint size + 1
    pieces: int            # the hint layer's maxout pieces: the regressor has the same non-linearity
    regressor_params: int  # 0: the shapes match and the guided map is compared to the hint directly

    @property
    def name(self) -> str:
        return f"hint:{self.guided}<-{self.hint}"


def plan_hints(teacher: Net, student: Net, pairs) -> list[HintPlan]:
    """Check every hint/guided pair and size its convolutional regressor; shallowest guided layer first."""
    if not pairs:
        raise ConfigError("hints.pairs is empty but the schedule has a hint stage; name at least one pair "
                          "or use schedule=kd")
    guided = [p.guided for p in pairs]
    if len(set(guided)) != len(guided):
        raise ConfigError(f"hints.pairs guides a student layer twice ({', '.join(guided)}); one hint per guided layer")
    plans = []
    for pair in pairs:
        teacher.check_layer(pair.hint, "hint")
        student.check_layer(pair.guided, "guided")
        hint_shape, guided_shape = teacher.shapes[pair.hint], student.shapes[pair.guided]
        where = f"hint {pair.hint} {_fmt(hint_shape)} <- guided {pair.guided} {_fmt(guided_shape)}"
        if len(hint_shape) != 3 or len(guided_shape) != 3:
            raise ConfigError(f"{where}: the convolutional regressor needs conv layers on both sides")
        kernel = (guided_shape[1] - hint_shape[1] + 1, guided_shape[2] - hint_shape[2] + 1)
        if kernel[0] != kernel[1]:
            raise ConfigError(f"{where}: the regressor needs square maps on both sides")
        if min(kernel) < 1:
            raise ConfigError(f"{where}: the teacher's map is larger than the student's, so no unpadded "
                              "regressor can join them; pick a deeper hint layer or a shallower guided layer")
        pieces = teacher.layers[pair.hint].spec.pieces
        # As the authors' code: identical shapes need no regressor.
        params = 0 if hint_shape == guided_shape else (kernel[0] * kernel[1] * guided_shape[0] + 1) * hint_shape[0] * pieces
        plans.append(HintPlan(pair.hint, pair.guided, hint_shape, guided_shape, kernel, pieces, params))
    order = student.names
    return sorted(plans, key=lambda p: order.index(p.guided))


def make_regressors(plans: list[HintPlan], init_range: float, max_norm: float) -> nn.ModuleDict:
    """guided layer name -> regressor, for the pairs whose shapes differ."""
    return nn.ModuleDict({p.guided: make_regressor(p, init_range, max_norm) for p in plans if p.regressor_params})


def make_regressor(plan: HintPlan, init_range: float, max_norm: float) -> MaxoutLayer:
    """A maxout conv from the guided map to the hint map: same pieces as the hint layer, no padding."""
    spec = Layer(name="regressor", kind="conv", out=plan.hint_shape[0], pieces=plan.pieces,
                 kernel=plan.kernel[0], max_norm=max_norm)
    regressor = MaxoutLayer(spec, plan.guided_shape[0])
    init_uniform(regressor, init_range)
    return regressor


def plan_table(plans: list[HintPlan]) -> Table:
    """The hint plan as a rich table, printed when a run starts."""
    table = Table(title="hint plan")
    for col in ("guided (student)", "shape", "hint (teacher)", "shape", "regressor kernel", "regressor params"):
        table.add_column(col)
    for p in plans:
        kernel = f"{p.kernel[0]}x{p.kernel[1]} maxout x{p.pieces}" if p.regressor_params else "none (same shape)"
        table.add_row(p.guided, _fmt(p.guided_shape), p.hint, _fmt(p.hint_shape), kernel, f"{p.regressor_params:,}")
    return table


def _fmt(shape) -> str:
    return "x".join(str(s) for s in (shape[1:] + shape[:1] if len(shape) == 3 else shape))
