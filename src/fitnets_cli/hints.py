"""The hint plan: which teacher (hint) layer guides which student (guided) layer, through which regressor."""

from dataclasses import dataclass

from rich.table import Table

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
    regressor_params: int

    @property
    def name(self) -> str:
        return f"hint:{self.guided}<-{self.hint}"


def plan_hints(teacher: Net, student: Net, pairs) -> list[HintPlan]:
    """Check every hint/guided pair and size its convolutional regressor; shallowest guided layer first."""
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
        params = kernel[0] * kernel[1] * guided_shape[0] * hint_shape[0] * pieces + hint_shape[0] * pieces
        plans.append(HintPlan(pair.hint, pair.guided, hint_shape, guided_shape, kernel, pieces, params))
    order = student.names
    return sorted(plans, key=lambda p: order.index(p.guided))


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
        table.add_row(p.guided, _fmt(p.guided_shape), p.hint, _fmt(p.hint_shape),
                      f"{p.kernel[0]}x{p.kernel[1]} maxout x{p.pieces}", f"{p.regressor_params:,}")
    return table


def _fmt(shape) -> str:
    return "x".join(str(s) for s in (shape[1:] + shape[:1] if len(shape) == 3 else shape))
