"""Scaling out: torchrun data parallelism (2 gloo ranks on CPU) and a parallel Hydra launcher sweep."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fitnets_cli import api
from helpers import call, in_stage, main, signal_when, stage_of, start

# SGD: its update is linear in the gradient, so one process and two ranks stay within float rounding of
# each other (RMSProp divides by tiny early gradients and amplifies rounding until the runs drift apart).
RUN = ["student=fitnet_mnist", "schedule=fitnets", "recipe.student.max_epochs=3", "recipe.student.batch_size=16",
       "recipe.student.optimizer=sgd", "recipe.student.lr=0.05", "recipe.student.momentum=0.5",
       "recipe.student.init_range=0.05", "deterministic=true"]


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fitnets_cli")


def torchrun(*args, cwd):
    """`torchrun --nproc_per_node=2 -m fitnets_cli ...` on CPU (gloo)."""
    proc = start(*args, cwd=cwd, command=TORCHRUN)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"torchrun {' '.join(map(str, args))} failed:\n{out}\n{err}"
    return out


@pytest.fixture(scope="module")
def runs(teacher, tmp_path_factory):
    """The same student run by one process and by two ranks with the same global batch: (root, overrides,
    the single run, the distributed run). The distributed run uses the default (timestamped) run directory,
    in a directory of its own."""
    _, base = teacher
    root = tmp_path_factory.mktemp("scale")
    call("train", *base, *RUN, f"hydra.run.dir={root / 'single'}")
    (root / "ddp").mkdir()
    torchrun("train", *base, *RUN, cwd=root / "ddp")
    [ddp] = (root / "ddp" / "runs" / "train").iterdir()
    return root, base, root / "single", ddp


def numbers(run: Path) -> list[float]:
    """Every training and validation figure of a run, in order, then its test loss and accuracy."""
    m = json.loads((run / "metrics.json").read_text())
    out = [v for st in m["stages"] for h in st["history"] for k, v in h.items() if k.startswith(("train_", "valid_"))]
    return out + [m["test"]["loss"], m["test"]["acc"]]


@pytest.mark.slow
def test_two_ranks_train_like_one_process_with_the_same_global_batch(runs):
    _, _, single_run, ddp = runs
    single, distributed = numbers(single_run), numbers(ddp)
    # 2 stages x 3 epochs: hint loss train/valid, then ce, kd, acc train and loss, acc, error valid; test loss, acc
    assert len(single) == len(distributed) == 3 * 2 + 3 * 6 + 2
    # Within float rounding: the two ranks sum their halves' gradients in another order.
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(single, distributed)), \
        list(zip(single, distributed))
    assert json.loads((ddp / "metrics.json").read_text())["test"]["acc"] == \
        json.loads((single_run / "metrics.json").read_text())["test"]["acc"]


@pytest.mark.slow
def test_eval_under_torchrun_splits_the_test_set_and_reports_it_once(runs, tmp_path):
    _, base, single, _ = runs
    out = torchrun("eval", f"checkpoint={single / 'checkpoints' / 'student.pt'}", base[1], "device=cpu", cwd=tmp_path)
    [row] = [line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│ fitnet_mnist")]
    test = json.loads((single / "metrics.json").read_text())["test"]   # what the run measured in one process
    assert [c.strip() for c in row] == ["fitnet_mnist", "student", "mnist", "mnist", f"{test['acc']:.2%}",
                                        f"{test['error']:.2%}", f"{test['loss']:.4f}"]


@pytest.mark.slow
def test_all_ranks_share_one_run_directory_and_only_rank_0_writes(runs):
    root, _, _, run = runs
    assert list((root / "ddp").rglob("metrics.json")) == [run / "metrics.json"]   # ${now:...} resolved once
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "regressor-conv4.pt", "student.pt"]
    assert not list(run.rglob("*.tmp")) and sorted(p.name for p in (run / ".hydra").iterdir()) == \
        ["config.yaml", "hydra.yaml", "overrides.yaml"]
    # TensorBoard names its files after the writing process: a single writer pid.
    pids = {p.name.split(".")[4] for p in (run / "tb").rglob("events.out.tfevents.*")}
    assert len(pids) == 1, pids


@pytest.mark.slow
def test_a_distributed_run_resumes_after_sigterm(runs, tmp_path):
    _, base, _, reference = runs
    run = tmp_path / "run"
    proc = start("train", *base, *RUN, f"hydra.run.dir={run}", cwd=tmp_path, command=TORCHRUN)
    # torchrun passes the signal on to both ranks
    signal_when(proc, run / "checkpoints" / "last.pt", lambda s: stage_of(s) == 0 and in_stage(s) and in_stage(s)["epoch"] >= 1,
                signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and not (run / "metrics.json").exists(), out + err
    assert f"Resume with: fitnets train resume={run}" in err
    torchrun("train", f"resume={run}", cwd=tmp_path)
    resumed, uninterrupted = numbers(run), numbers(reference)
    assert len(resumed) == len(uninterrupted) and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)
                                                      for a, b in zip(resumed, uninterrupted)), \
        list(zip(resumed, uninterrupted))


@pytest.mark.slow
@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_multirun_under_torchrun_is_refused_in_one_line(tmp_path, rank):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank}
    proc = subprocess.run([sys.executable, "-m", "fitnets_cli", "train", "-m", "seed=0,1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    if rank == "0":
        [line] = proc.stderr.strip().splitlines()
        assert "-m (multirun) cannot run under torchrun" in line and "hydra/launcher=joblib" in line
    else:
        assert proc.stderr == ""                      # rank 0 says it once
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_joblib_sweep_of_two_backprop_jobs_needs_no_teacher_and_compare_reads_it(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    call("train", "-m", *tiny, "student=fitnet_mnist", "schedule=backprop", "seed=0,1",
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}")
    runs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert {job: (m["seed"], [s["epochs"] for s in m["stages"]]) for job, m in runs.items()} == \
        {"0": (0, [2]), "1": (1, [2])}
    assert not (tmp_path / "teachers").exists()        # the teacher store was never needed
    rows = json.loads(main("compare", f"runs={sweep}", "speed.enabled=false", "format=json"))
    assert [(r["model"], r["schedule"], r["seeds"]) for r in rows] == [("fitnet_mnist", "backprop", 2)]


def test_the_slurm_preset_composes_onto_submitit():
    cfg = api.composed("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1
    assert launcher.partition == "gpu"


def test_jobs_of_a_parallel_sweep_spread_over_the_gpus():
    from fitnets_cli.runtime.dist import gpu_index
    assert [gpu_index(4, job) for job in range(6)] == [0, 1, 2, 3, 0, 1]
    assert gpu_index(4, None) == 0


@pytest.mark.slow
def test_a_term_with_parameters_trains_under_torchrun_as_in_one_process(runs, monkeypatch):
    root, base, _, _ = runs
    examples = Path(__file__).parents[1] / "docs" / "examples"
    monkeypatch.setenv("PYTHONPATH", f"{examples}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(examples))
    own = ["schedule.stages.1.terms=[{term: ce}, {term: kd}, {_target_: my_terms.ProjectedHint, weight: 2.0}]"]
    call("train", *base, *RUN, *own, f"hydra.run.dir={root / 'own_single'}")
    (root / "own_ddp").mkdir()
    torchrun("train", *base, *RUN, *own, "hydra.run.dir=run", cwd=root / "own_ddp")
    single, distributed = numbers(root / "own_single"), numbers(root / "own_ddp" / "run")
    assert len(single) == len(distributed) == 3 * 2 + 3 * 7 + 2   # the term's own figure each stage-2 epoch
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(single, distributed)), \
        list(zip(single, distributed))
