"""`fitnets layers`: the tap points of a teacher and a student, the default hint pair, the hint plan and the
schedule's stages."""

from rich.table import Table

from fitnets_cli.config.commands import LayersConfig
from fitnets_cli.networks.build import build_network
from fitnets_cli.runtime.ui import console
from fitnets_cli.training.hints import default_tap, fmt, plan_hints, plan_table
from fitnets_cli.training.stages import plan_stages, stage_table


def tap_table(net, role: str, marked: set[str]) -> Table:
    """A network's taps with their output shapes: its stages first (a timm model's feature_info), then every
    tap in forward order; token sequences say so; `marked` taps carry an arrow."""
    hooked = " (read with forward hooks: torch.fx cannot trace it)" if getattr(net, "untraceable", None) else ""
    table = Table(title=f"{role} {net.build_spec['name']}: {len(net.shapes)} taps{hooked}")
    described = bool(net.stages or net.tokens)
    for col in ("tap", "output (HxWxC)", "") + (("kind",) if described else ()):
        table.add_column(col)
    for tap in net.stages + [t for t in net.shapes if t not in net.stages]:
        mark = f"<- {'hint' if role == 'teacher' else 'guided'}" if tap in marked else ""
        kind = "stage, " if tap in net.stages else ""
        if tap in net.tokens:
            prefix, grid = net.tokens[tap]
            kind += f"tokens: {prefix} prefix + {'x'.join(map(str, grid))} patches, read as a map"
        table.add_row(tap, fmt(net.shapes[tap]), mark, *([kind.rstrip(", ")] if described else []))
    return table


def layers_command(cfg: LayersConfig) -> dict:
    """Print the teacher's and the student's taps, the plan of hints.pairs (default pair if unset) and the
    schedule's stages; return the taps' shapes, the plan and the stages."""
    shape, classes = cfg.dataset.in_shape, cfg.dataset.num_classes
    teacher = build_network(cfg.teacher, shape, classes)
    student = build_network(cfg.student, shape, classes)
    pairs = cfg.hints.pairs
    hints = {p.hint or default_tap(teacher) for p in pairs}
    guided = {p.guided or default_tap(student) for p in pairs}
    console.print(tap_table(teacher, "teacher", hints))
    console.print(tap_table(student, "student", guided))
    console.print(f"default pair: hint {default(cfg.teacher.hint, teacher)} <- guided "
                  f"{default(cfg.student.guided, student)}")
    plans = plan_hints(teacher, student, pairs, cfg.hints)
    console.print(plan_table(plans))
    stages = plan_stages(cfg, teacher, student)
    console.print(stage_table(stages))
    return {"teacher": {tap: list(shape) for tap, shape in teacher.shapes.items()},
            "student": {tap: list(shape) for tap, shape in student.shapes.items()},
            "plans": [{"hint": p.hint, "guided": p.guided, "hint_shape": list(p.hint_shape),
                       "guided_shape": list(p.guided_shape), "regressor": p.regressor} for p in plans],
            "stages": [{"name": st.name, "trains": st.describe(), "terms": [t.describe() for t in st.terms]}
                       for st in stages]}


def default(configured: str | None, net) -> str:
    """A network's default tap, and where it comes from."""
    if configured:
        return f"{configured} (its config)"
    if net.hint_point is not None:
        return f"{net.hint_point} (the network's hint point)"
    rule = "the middle stage of feature_info" if net.stages else \
        "the second group of blocks" if len(net.groups) >= 2 else "the middle layer"
    return f"{default_tap(net)} ({rule})"
