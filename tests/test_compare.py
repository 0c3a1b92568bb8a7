"""`fitnets compare` and the experiment presets on tiny data, through the entry point: in a subprocess, or its
main() in this process where the same command runs many times."""

import csv
import io
import itertools
import json
import statistics
import struct
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fitnets_cli.networks.build import build_network
from fitnets_cli.training.stages import plan_stages

from helpers import call, main, write_tiny_mnist

EXPERIMENTS = sorted(p.name[:-5] for p in resources.files("fitnets_cli.conf").joinpath("experiment").iterdir()
                     if p.name.endswith(".yaml"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The MNIST Table 4 preset as a sweep over two seeds, on tiny data: a teacher and 3 x 2 students."""
    root = tmp_path_factory.mktemp("compare")
    data = write_tiny_mnist(root / "data")
    call("train", "-m", "experiment=mnist_table4", "seed=0,1", f"data.root={data}", "dataset.valid_size=50",
         f"teacher_store={root / 'teachers'}", "recipe.teacher.max_epochs=2", "recipe.student.max_epochs=2",
         "recipe.teacher.optimizer=rmsprop", "recipe.teacher.lr=0.002", "recipe.teacher.momentum=0",
         "recipe.teacher.momentum_final=0", "recipe.student.lr=0.002",
         "device=cpu", f"hydra.sweep.dir={root / 'sweep'}")
    return root / "sweep"


def compare_json(*args):
    return json.loads(main("compare", *args, "speed.repeats=1", "speed.warmup=0", "format=json"))


def md_table(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of cells of a markdown table."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


@pytest.fixture(scope="module")
def tables(sweep, tmp_path_factory):
    """The sweep compared once in each output (in this process): JSON (latency measured), CSV, markdown to a
    file with the plots, and markdown of test error."""
    out = tmp_path_factory.mktemp("tables")
    runs, fast = f"runs={sweep}", "speed.enabled=false"
    main("compare", runs, fast, "format=md", f"out={out / 'table.md'}", f"plots={out / 'plots'}")
    return {"json": compare_json(runs),
            "csv": list(csv.DictReader(io.StringIO(main("compare", runs, fast, "format=csv")))),
            "md": (out / "table.md").read_text(),
            "error": main("compare", runs, fast, "format=md", "metric=error"),
            "plots": out / "plots"}


@pytest.mark.slow
def test_the_preset_sweep_runs_teacher_and_all_three_schedules(sweep):
    runs = [json.loads(p.read_text()) for p in sorted(sweep.rglob("metrics.json"))]
    assert sorted(m["schedule"] for m in runs) == ["backprop", "backprop", "fitnets", "fitnets", "kd", "kd", "teacher"]
    stages = {"teacher": ["ce"], "backprop": ["ce"], "kd": ["kd"], "fitnets": ["hint:conv4<-conv2", "kd"]}
    for m in runs:
        assert [(s["name"], s["epochs"]) for s in m["stages"]] == [(name, 2) for name in stages[m["schedule"]]]


@pytest.mark.slow
def test_compare_groups_seeds_into_mean_and_sample_std(tables):
    rows = tables["json"]
    assert [(r["model"], r["schedule"], r["seeds"]) for r in rows] == [
        ("maxout", "", 1), ("fitnet_mnist", "backprop", 2), ("fitnet_mnist", "kd", 2), ("fitnet_mnist", "fitnets", 2)]
    for row in rows[1:]:
        accs = [100 * json.loads((Path(d) / "metrics.json").read_text())["test"]["acc"] for d in row["runs"]]
        assert row["test_acc"] == pytest.approx(statistics.fmean(accs))
        assert row["test_acc_std"] == pytest.approx(statistics.stdev(accs))
        assert row["gap_teacher"] == pytest.approx(row["test_acc"] - rows[0]["test_acc"])
        assert row["compression"] == pytest.approx(rows[0]["params"] / row["params"])
        assert row["speedup"] == pytest.approx(rows[0]["latency_ms"] / row["latency_ms"])
        # One architecture, so one measurement: the three student rows share it.
        assert row["latency_ms"] == rows[1]["latency_ms"] > 0
    assert rows[3]["gap_backprop"] == pytest.approx(rows[3]["test_acc"] - rows[1]["test_acc"])
    assert rows[1]["gap_backprop"] is None


@pytest.mark.slow
def test_every_output_format_parses_back(tables):
    as_json, as_csv = tables["json"], tables["csv"]
    assert [r["schedule"] for r in as_csv] == [r["schedule"] for r in as_json]
    assert [float(r["test_acc"]) for r in as_csv] == pytest.approx([r["test_acc"] for r in as_json])
    assert [float(r["test_error"]) for r in as_csv] == pytest.approx([100 - r["test_acc"] for r in as_json])
    assert [int(r["params"]) for r in as_csv] == [r["params"] for r in as_json]
    header, cells = md_table(tables["md"])
    assert len(cells) == 4 and all(len(c) == len(header) for c in cells)
    acc = header.index("test acc % best-valid")
    for row, r in zip(cells, as_json):
        assert row[acc] == f"{r['test_acc']:.2f}" + (f" ± {r['test_acc_std']:.2f}" if r["seeds"] > 1 else "")
    assert isinstance(as_json[1]["params"], int) and isinstance(as_json[1]["test_acc"], float)


@pytest.mark.slow
def test_metric_error_shows_test_error_and_error_gaps(tables):
    as_json = tables["json"]
    header, cells = md_table(tables["error"])
    err, gap = header.index("test error % best-valid"), header.index("vs teacher")
    for row, r in zip(cells[1:], as_json[1:]):
        assert float(row[err].split(" ± ")[0]) == pytest.approx(100 - r["test_acc"], abs=0.006)
        assert float(row[gap]) == pytest.approx(-r["gap_teacher"], abs=0.006)


def test_plots_are_written_whole_at_their_size(tables):
    # figsize x dpi 120: the trade-off plots 7 x 4.5 inches, the curves 15 x 4.5
    sizes = {"acc_vs_mults.png": (840, 540), "acc_vs_params.png": (840, 540), "curves.png": (1800, 540)}
    assert sorted(p.name for p in tables["plots"].iterdir()) == sorted(sizes)    # no temporary file left
    for name, size in sizes.items():
        data = (tables["plots"] / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and struct.unpack(">II", data[16:24]) == size, name


@pytest.mark.slow
def test_runs_that_differ_beyond_the_seed_are_labelled_apart(sweep, fitnet):
    run, _ = fitnet             # trained with the MNIST recipe's LR, 0.0005; the sweep's FitNets with 0.002
    rows = compare_json(f"runs=[{sweep},{run}]", "speed.enabled=false")
    fitnets_rows = [r for r in rows if r["schedule"] == "fitnets"]
    assert sorted((r["seeds"], r["variant"]) for r in fitnets_rows) == [(1, "student.lr=0.0005"), (2, "student.lr=0.002")]
    assert all("variant" not in r or r["variant"] is None for r in rows if r["schedule"] != "fitnets")


@pytest.mark.slow
def test_table5_architecture_comparison_reproduces_the_paper_counts():
    # cifar10: teacher + FitNets 1-4; a few timed repeats, as the speed-up ordering is checked below
    rows = {r["model"]: r for r in json.loads(main("compare", "counting=paper", "format=json", "speed.repeats=3",
                                                   "speed.warmup=1", "speed.batch_size=16"))}
    assert (rows["maxout"]["params"], rows["maxout"]["mults"]) == (9_044_360, 725_090_696)
    assert (rows["fitnet1"]["params"], rows["fitnet1"]["mults"]) == (249_576, 30_150_024)
    assert rows["fitnet2"]["params"] == 861_928 and rows["fitnet2"]["mults"] == pytest.approx(107.8e6, rel=1e-3)
    assert rows["fitnet4"]["params"] == pytest.approx(2.54e6, rel=2e-3)
    assert rows["fitnet4"]["mults"] == pytest.approx(381.7e6, rel=1e-3)
    assert rows["fitnet1"]["compression"] == pytest.approx(36, rel=0.01)      # Table 5: 36, 10.44, 3.60
    assert rows["fitnet2"]["compression"] == pytest.approx(10.44, rel=0.01)
    assert rows["fitnet4"]["compression"] == pytest.approx(3.60, rel=0.02)
    # 12x fewer multiplications than FitNet 4: faster even on a busy machine (FitNet 4 vs the teacher,
    # 1.9x fewer, is too close to assert under load)
    assert rows["fitnet1"]["speedup"] > rows["fitnet4"]["speedup"]
    for name in ("fitnet1", "fitnet2", "fitnet3", "fitnet4"):
        assert rows[name]["speedup"] == pytest.approx(rows["maxout"]["latency_ms"] / rows[name]["latency_ms"])


def test_the_issue_presets_exist():
    assert {"cifar10_table5", "cifar100", "svhn", "mnist_table4", "depth_study", "crd_cifar100"} <= set(EXPERIMENTS)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_job_of_every_preset_composes_and_plans_its_hints(make_config, experiment):
    preset = OmegaConf.load(resources.files("fitnets_cli.conf").joinpath(f"experiment/{experiment}.yaml").open())
    params = OmegaConf.select(preset, "hydra.sweeper.params") or {}
    # Comma lists are the basic sweeper's jobs; an Optuna distribution (interval(1, 8)) keeps the preset's value.
    grid = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items() if "(" not in str(vals)]
    jobs = list(itertools.product(*grid))
    expected = {"depth_study": 24, "cifar10_table5": 4, "mnist_table4": 3, "mnist_table4_cpu": 9, "svhn": 2,
                "imagenet_r34_r18": 4, "crd_cifar100": 13 * 4, "crd_mnist_cpu": 4, "mnist_vit_to_cnn_cpu": 4,
                "mnist_cnn_to_vit_cpu": 4, "ofa_cifar100": 4 * 4}
    assert len(jobs) == expected.get(experiment, 1)
    # The ImageNet preset's teacher comes trained, from a file; its shape comes from the image files.
    given = ["teacher.weights=resnet34.pth"] if experiment == "imagenet_r34_r18" else []
    built = {}   # each network once: the jobs of a preset share them

    def net(spec, shape, classes):
        if repr(spec) not in built:
            built[repr(spec)] = build_network(replace(spec, weights=None, pretrained=False), shape, classes)
        return built[repr(spec)]

    for job in jobs:
        cfg = make_config("train", [f"experiment={experiment}", *given, *job])
        assert cfg.teacher.auto_train != bool(given)
        shape = cfg.dataset.in_shape or [cfg.dataset.images.channels] + [cfg.dataset.images.size] * 2
        classes = cfg.dataset.num_classes or 10
        assert plan_stages(cfg, net(cfg.teacher, shape, classes), net(cfg.student, shape, classes))


# dataset; (student, schedule) of every job run; whether the preset retrains on train + valid; the students run.
# Every student of every preset is built and trained a step in test_models and every job composes and plans its
# hints above: the sweeps here run the smallest and the largest student of the presets that have more.
PRESET_JOBS = {
    "cifar10_table5": ("cifar10", [("fitnet1", "fitnets"), ("fitnet4", "fitnets")], True, "fitnet1,fitnet4"),
    "cifar100": ("cifar100", [("fitnet4", "fitnets")], True, None),
    "svhn": ("svhn", [("fitnet3", "fitnets"), ("fitnet4", "fitnets")], False, None),
    "depth_study": ("cifar10", [(student, s) for student in ("depth5_30m", "depth11_107m")
                                for s in ("backprop", "kd", "fitnets")], False, "depth5_30m,depth11_107m"),
}


@pytest.mark.slow
@pytest.mark.parametrize("experiment,valid", [("cifar10_table5", 10), ("cifar100", 10), ("svhn", 30), ("depth_study", 10)])
def test_cifar_and_svhn_presets_run_as_multiruns(experiment, valid, tiny_datasets, tmp_path):
    sweep = tmp_path / "sweep"
    dataset, jobs, retrain, only = PRESET_JOBS[experiment]
    call("train", "-m", f"experiment={experiment}", "seed=0", f"data.root={tiny_datasets[dataset]}",
         f"dataset.valid_size={valid}", f"teacher_store={tmp_path / 'teachers'}", "recipe.teacher.max_epochs=1",
         "recipe.student.max_epochs=1", "device=cpu", f"hydra.sweep.dir={sweep}",
         *([f"student={only}"] if only else []), md5=False)
    runs = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    [teacher] = [m for m in runs if m["role"] == "teacher"]
    students = [m for m in runs if m["role"] == "student"]
    assert sorted((m["model"], m["schedule"]) for m in students) == sorted(jobs) and len(runs) == len(jobs) + 1
    for m in runs:
        kinds = {"teacher": 1, "backprop": 1, "kd": 1, "fitnets": 2}[m["schedule"]]
        assert [s["epochs"] for s in m["stages"]] == [1] * kinds
        assert [r["name"] for r in m.get("retrain", [])] == ([f"retrain/{s['name']}" for s in m["stages"]]
                                                            if retrain else [])
    rows = compare_json(f"runs={sweep}", "speed.enabled=false")
    assert len(rows) == len(jobs) + 1 and rows[0]["role"] == "teacher" and rows[0]["dataset"] == teacher["dataset"]
