"""`fitnets compare`: students against their teacher in the columns of the paper's Table 5 (layers, params,
multiplications, accuracy, speed-up, compression), from finished runs and/or model configs."""

import csv
import glob
import io
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.table import Table

from fitnets_cli.commands.benchmark import benchmark_view
from fitnets_cli.config.commands import CompareConfig, to_config
from fitnets_cli.config.errors import ConfigError, one_line
from fitnets_cli.config.groups import Student
from fitnets_cli.networks import zoo
from fitnets_cli.networks.build import build_network, count, network_of
from fitnets_cli.networks.checkpoint import load_payload
from fitnets_cli.runtime.dist import pick_device
from fitnets_cli.runtime.files import write_text
from fitnets_cli.runtime.ui import console, errors

# key -> column header. Accuracies are in percent; gaps are percentage points.
COLUMNS = {
    "model": "model", "teacher": "teacher", "schedule": "schedule", "variant": "variant", "dataset": "dataset",
    "seeds": "seeds",
    "layers": "layers", "params": "params", "mults": "mults", "flops": "FLOPs (2x mults)",
    "latency_ms": "latency ms", "speedup": "speed-up", "compression": "compression",
    "test_acc": "test acc % best-valid", "test_acc_last": "test acc % last-epoch",
    "gap_teacher": "vs teacher", "gap_backprop": "vs backprop",
}
TEXT_COLUMNS = ("model", "teacher", "schedule", "variant", "dataset")
SCHEDULE_ORDER = ("", "backprop", "kd", "hint_joint", "crd_fitnet", "at", "sp", "pkt", "dkd", "at_kd", "fitnets")
# Config keys that do not change what a run measures: runs that differ only in these (and the seed) group.
# (checkpoint, students ... speed: keys that the configs of runs made before each command had its own schema held.)
NOT_IDENTITY = ("seed", "command", "device", "counting", "checkpoint", "eval_batch_size", "students", "runs",
                "format", "out", "plots", "speed", "teacher_store", "data.root", "data.cache", "data.download",
                "teacher.checkpoint", "teacher.auto_train", "teacher.variants")
# A teacher's run is also unaffected by the student settings of the config it was trained under.
NOT_TEACHER_IDENTITY = ("student", "hints", "schedule", "recipe.student", "recipe.kd", "recipe.retrain_full")


def load_student(name: str) -> Student:
    """The student that `fitnets train student=NAME` trains: the `student` group's option NAME (a conf/student/
    file, or a network of the zoo, which zoo.py stores as an option), composed by Hydra as `train` composes it.
    Inside `fitnets compare` (a Hydra app) Hydra is initialised; from Python it is initialised for the call."""
    if GlobalHydra.instance().is_initialized():
        return compose_student(name)
    with initialize_config_module("fitnets_cli.conf", version_base="1.3"):
        return compose_student(name)


def compose_student(name: str) -> Student:
    """load_student's work, with Hydra initialised: an unknown name is a one-line error listing the options."""
    options = GlobalHydra.instance().config_loader().get_group_options("student")
    if name not in options:
        files = [o for o in options if o not in zoo.NETWORKS]
        raise ConfigError(f"students: no student config {name!r}; options are {', '.join(files)} "
                          f"and the zoo's networks ({', '.join(zoo.NETWORKS)})")
    try:
        return to_config(compose("layers", overrides=[f"student={name}"])).student
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"students: {name}: {one_line(err)}") from None


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
    return sorted(set(runs))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: json.dumps(v)})
    return out


def _identity(run: dict) -> dict:
    skip = NOT_IDENTITY + (NOT_TEACHER_IDENTITY if run["metrics"]["role"] == "teacher" else ())
    return {k: v for k, v in _flat(run["config"]).items()
            if not any(k == s or k.startswith(s + ".") for s in skip)}


def load_run(path: Path) -> dict:
    """A finished run's metrics, resolved config and saved architecture."""
    metrics = json.loads((path / "metrics.json").read_text())
    payload = load_payload(path / "checkpoints" / f"{metrics['role']}.pt")
    config = OmegaConf.to_container(OmegaConf.load(path / "config_resolved.yaml"))
    return {"dir": path, "metrics": metrics, "config": config, "arch": payload}


def group_runs(runs: list[dict]) -> list[list[dict]]:
    """Runs whose configs differ only by seed (and output settings), in first-seen order."""
    groups = {}
    for run in runs:
        groups.setdefault(json.dumps(sorted(_identity(run).items())), []).append(run)
    return list(groups.values())


def _mean_std(values):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_row(group: list[dict], counting: str) -> dict:
    """One table row for runs that differ only by seed: accuracy mean and sample std over seeds."""
    m, arch = group[0]["metrics"], group[0]["arch"]
    network = network_of(arch["network"])
    acc = _mean_std([100 * r["metrics"]["test"]["acc"] for r in group])
    last = _mean_std([100 * r["metrics"].get("test_last", r["metrics"]["test"])["acc"] for r in group])
    student = m["role"] == "student"
    return {"model": m["model"], "role": m["role"], "teacher": m.get("teacher") if student else None,
            "schedule": m["schedule"] if student else "", "dataset": m["dataset"], "seeds": len(group),
            **count(build_network(network, arch["in_shape"], arch["num_classes"]), counting),
            "arch": (network, arch["in_shape"], arch["num_classes"]),
            "test_acc": acc[0], "test_acc_std": acc[1], "test_acc_last": last[0], "test_acc_last_std": last[1],
            "runs": [str(r["dir"]) for r in group], "identity": _identity(group[0])}


def _label_variants(rows: list[dict]) -> None:
    """Where groups share model, teacher, schedule and dataset, name the settings that tell them apart."""
    by_label = {}
    for r in rows:
        by_label.setdefault((r["model"], r.get("teacher"), r["schedule"], r["dataset"]), []).append(r)
    for same in by_label.values():
        if len(same) > 1:
            keys = sorted({k for r in same for k, v in r["identity"].items() if any(o["identity"].get(k) != v for o in same)})
            for r in same:
                r["variant"] = ", ".join(f"{'.'.join(k.split('.')[-2:])}={json.loads(r['identity'][k])}"
                                         for k in keys if k in r["identity"])


def arch_rows(cfg: CompareConfig) -> list[dict]:
    """Rows for the configured teacher and students, before any training."""
    shape, classes = cfg.dataset.in_shape, cfg.dataset.num_classes
    rows = [{"model": cfg.teacher.name, "role": "teacher", "schedule": "", "dataset": cfg.dataset.name,
             "network": cfg.teacher}]
    rows += [{"model": name, "role": "student", "schedule": "", "dataset": cfg.dataset.name,
              "network": load_student(name)} for name in cfg.students or cfg.dataset.students]
    for r in rows:
        network = r.pop("network")
        r.update(count(build_network(replace(network, weights=None), shape, classes), cfg.counting),
                 arch=(network, shape, classes))
    return rows


def measure_latency(rows: list[dict], speed, device) -> None:
    """Median batched inference latency (ms) of each row's architecture, after warm-up."""
    cache = {}
    for r in rows:
        network, shape, classes = r["arch"]
        key = json.dumps([repr(network), list(shape), classes])
        if key not in cache:
            net = build_network(replace(network, weights=None), shape, classes).to(device).eval()
            x = torch.randn(speed.batch_size, *shape, device=device)
            times = []
            with torch.no_grad():
                for i in range(speed.warmup + speed.repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    net(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
            cache[key] = 1000 * statistics.median(times[speed.warmup:])
        r["latency_ms"] = cache[key]


def device_name(device) -> str:
    """The device that latencies were measured on, in words."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def add_references(rows: list[dict]) -> None:
    """Speed-up, compression and accuracy gaps against the same dataset's teacher and backprop student."""
    for r in rows:
        teachers = [t for t in rows if t["role"] == "teacher" and t["dataset"] == r["dataset"]]
        # The row's own teacher where its runs name one that is among the rows, else the dataset's first.
        teacher = next((t for t in teachers if t["model"] == r.get("teacher")), teachers[0] if teachers else None)
        # The same student by backprop: of several, the one whose settings match this row's most closely.
        backprops = [b for b in rows if b["schedule"] == "backprop" and b["dataset"] == r["dataset"]
                     and b["model"] == r["model"]]
        backprop = max(backprops, default=None, key=lambda b: sum(
            b.get("identity", {}).get(k) == v for k, v in r.get("identity", {}).items()))
        if teacher:
            r["compression"] = teacher["params"] / r["params"]
            if "latency_ms" in r:
                r["speedup"] = teacher["latency_ms"] / r["latency_ms"]
            if "test_acc" in r and "test_acc" in teacher and r is not teacher:
                r["gap_teacher"] = r["test_acc"] - teacher["test_acc"]
        if backprop and "test_acc" in r and r["schedule"] != "backprop":
            r["gap_backprop"] = r["test_acc"] - backprop["test_acc"]


def header(key: str, metric: str) -> str:
    """A column's header; with metric=error the accuracy columns show test error."""
    return COLUMNS[key].replace("test acc", "test error") if metric == "error" else COLUMNS[key]


def _cell(row: dict, key: str, metric: str = "accuracy") -> str:
    v = row.get(key)
    if v is None or v == "":
        return ""
    if metric == "error" and key in ("test_acc", "test_acc_last", "gap_teacher", "gap_backprop"):
        v = 100 - v if key.startswith("test") else -v   # error gaps: negative is fewer errors
    if key in ("test_acc", "test_acc_last"):
        return f"{v:.2f}" + (f" ± {row[key + '_std']:.2f}" if row.get("seeds", 0) > 1 else "")
    if key in ("gap_teacher", "gap_backprop"):
        return f"{v:+.2f}"
    if key in ("params", "mults", "flops"):
        return _human(v)
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _human(n: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def render(rows: list[dict], columns: list[str], fmt: str, note: str, metric: str = "accuracy") -> str:
    """The table as markdown (the shown columns), or CSV / JSON (every column, raw numbers, one object per
    row), so scripts see the same fields whatever the rows hold."""
    keys = list(COLUMNS) + ["test_acc_std", "test_acc_last_std", "role"]
    rows = [{**r, "test_error": 100 - r["test_acc"]} if "test_acc" in r else r for r in rows]
    keys.insert(keys.index("test_acc") + 1, "test_error")
    if fmt == "json":
        return json.dumps([{k: r.get(k) for k in keys + ["runs"]} for r in rows], indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(keys)
        writer.writerows([[r.get(k, "") for k in keys] for r in rows])
        return buf.getvalue()
    lines = ["| " + " | ".join(header(c, metric) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, c, metric) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + f"\n\n{note}\n"


def emit(table: Table, text: str | None, cfg: CompareConfig) -> None:
    """Show the rich table (format=table, or beside a file written with out=) and print or write the text."""
    if cfg.format == "table" or cfg.out:
        console.print(table)
    if text is not None:
        if cfg.out:
            write_text(Path(cfg.out), text)
            console.print(f"wrote {cfg.out}")
        else:
            print(text, end="")


def compare_command(cfg: CompareConfig) -> list[dict]:
    """Print (or write) the comparison table, and the plots when plots=DIR."""
    rows = []
    if cfg.runs:
        runs = [load_run(path) for path in find_runs(cfg.runs)]
        rows = [group_row(g, cfg.counting) for g in group_runs(runs)]
        _label_variants(rows)
    if cfg.students or not cfg.runs:
        rows += arch_rows(cfg)
    if cfg.layout == "benchmark":
        records, table, text = benchmark_view(rows, cfg.metric, cfg.format)
        emit(table, text, cfg)
        return records
    device = pick_device(cfg.device)
    note = f"counting={cfg.counting}; FLOPs = 2 x multiply-adds (torch.utils.flop_counter)"
    if cfg.speed.enabled:
        errors.print(f"measuring inference latency on {device_name(device)} ...")
        measure_latency(rows, cfg.speed, device)
        note += (f"; speed-up = teacher / model median latency, batch {cfg.speed.batch_size}, median of "
                 f"{cfg.speed.repeats} after {cfg.speed.warmup} warm-up, on {device_name(device)}")
    if cfg.runs:
        note += f"; test {cfg.metric}: mean ± sample std over seeds"
    if cfg.metric == "error":
        note += "; vs teacher / vs backprop: difference in test error, percentage points (negative: fewer errors)"
    add_references(rows)
    rows.sort(key=lambda r: (r["dataset"], r["role"] != "teacher", r.get("teacher") or "", r["model"],
                             SCHEDULE_ORDER.index(r["schedule"]) if r["schedule"] in SCHEDULE_ORDER else 9,
                             r.get("variant", "")))
    several = len({r.get("teacher") for r in rows if r["role"] == "student"}) > 1   # else its row says which
    columns = [c for c in COLUMNS if (c != "teacher" or several)
               and (any(r.get(c) not in (None, "") for r in rows) or c in ("model", "params", "mults"))]
    table = Table(title="compare", caption=note)
    for c in columns:
        table.add_column(header(c, cfg.metric), justify="left" if c in TEXT_COLUMNS else "right", overflow="fold",
                         no_wrap=c in ("model", "schedule", "dataset"))
    for r in rows:
        table.add_row(*(_cell(r, c, cfg.metric) for c in columns))
    emit(table, None if cfg.format == "table" else render(rows, columns, cfg.format, note, cfg.metric), cfg)
    if cfg.plots:
        from fitnets_cli.commands.plots import plot_curves, plot_tradeoffs
        written = plot_tradeoffs(rows, Path(cfg.plots))
        if cfg.runs:
            written.append(plot_curves(runs, Path(cfg.plots)))
        errors.print("plots: " + ", ".join(map(str, written)))
    return [{k: v for k, v in r.items() if k not in ("arch", "identity")} for r in rows]
