"""`fitnets compare`: students against their teacher in layers, params, multiplications and accuracy."""

import glob
import json
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf
from rich.table import Table

from fitnets_cli.checkpoint import load_payload
from fitnets_cli.config import ConfigError, Config, Layer, Student
from fitnets_cli.models import count
from fitnets_cli.ui import console


def load_student(name: str) -> Student:
    """A student config from the packaged conf/student group, by option name."""
    group = resources.files("fitnets_cli.conf").joinpath("student")
    path = group.joinpath(f"{name}.yaml")
    if not path.is_file():
        options = sorted(p.name[:-5] for p in group.iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"students: no student config {name!r}; options are {', '.join(options)}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Student), OmegaConf.load(path.open())))


def find_runs(patterns: list[str]) -> list[Path]:
    """Run directories (holding metrics.json) under each directory or glob, sweeps included."""
    runs = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(pattern))
        if not matches:
            raise ConfigError(f"runs: nothing matches {pattern!r}; pass run directories, globs or sweep directories")
        for path in matches:
            runs += [path] if (path / "metrics.json").is_file() else sorted(m.parent for m in path.rglob("metrics.json"))
    if not runs:
        raise ConfigError(f"runs: no metrics.json under {patterns}; are these finished fitnets runs?")
    return runs


def run_row(run: Path, counting: str) -> dict:
    """One finished run: its model's sizes (recounted from the checkpoint) and its test accuracy."""
    metrics = json.loads((run / "metrics.json").read_text())
    payload = load_payload(run / "checkpoints" / f"{metrics['role']}.pt")
    layers = [Layer(**spec) for spec in payload["layers"]]
    label = metrics["model"] if metrics["role"] == "teacher" else f"{metrics['model']} ({metrics['schedule']})"
    return {"model": label, "role": metrics["role"], "dataset": metrics["dataset"],
            **count(layers, payload["in_shape"], payload["num_classes"], counting), "test_acc": metrics["test"]["acc"]}


def compare_command(cfg: Config) -> list[dict]:
    """Print the comparison table: of finished runs (runs=...) or of the configured architectures."""
    if cfg.runs:
        rows = [run_row(run, cfg.counting) for run in find_runs(cfg.runs)]
    else:
        shape, classes = cfg.dataset.in_shape, cfg.dataset.num_classes
        rows = [{"model": f"{cfg.teacher.name} ({cfg.dataset.family})", "role": "teacher",
                 **count(cfg.teacher.layers, shape, classes, cfg.counting)}]
        rows += [{"model": name, "role": "student", **count(load_student(name).layers, shape, classes, cfg.counting)}
                 for name in cfg.students]
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    table = Table(title=f"compare (counting={cfg.counting})")
    columns = ["model", "layers", "params", "mults", "FLOPs (2 x mults)", "compression", "fewer mults"]
    if cfg.runs:
        columns.insert(1, "dataset")
        columns.append("test acc")
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "dataset") else "right")
    for r in rows:
        if teacher:
            r["compression"] = teacher["params"] / r["params"]
            r["mult_saving"] = teacher["mults"] / r["mults"]
        cells = {"model": r["model"], "dataset": r.get("dataset", ""), "layers": str(r["layers"]),
                 "params": f"{r['params']:,}", "mults": f"{r['mults']:,}", "FLOPs (2 x mults)": f"{r['flops']:,}",
                 "compression": f"{r['compression']:.2f}" if teacher else "",
                 "fewer mults": f"{r['mult_saving']:.2f}" if teacher else "",
                 "test acc": f"{r['test_acc']:.2%}" if "test_acc" in r else ""}
        table.add_row(*(cells[c] for c in columns))
    console.print(table)
    return rows
