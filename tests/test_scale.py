"""Scaling out: torchrun data parallelism (2 gloo ranks on CPU) and a parallel Hydra launcher sweep."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fitnets

# SGD: its update is linear in the gradient, so one process and two ranks stay within float rounding of
# each other (RMSProp divides by tiny early gradients and amplifies rounding until the runs drift apart).
RUN = ["student=fitnet_mnist", "schedule=fitnets", "recipe.student.max_epochs=3", "recipe.student.batch_size=16",
       "recipe.student.optimizer=sgd", "recipe.student.lr=0.05", "recipe.student.momentum=0.5",
       "recipe.student.init_range=0.05", "deterministic=true"]


def torchrun(*args, cwd, wait=True):
    """`torchrun --nproc_per_node=2 -m fitnets_cli ...` on CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fitnets_cli", *map(str, args)]
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A teacher, then the same student run by one process and by two ranks with the same global batch; the
    distributed run uses the default (timestamped) run directory, in a directory of its own."""
    from conftest import tiny_teacher
    root = tmp_path_factory.mktemp("scale")
    base = tiny_teacher(root)
    fitnets("train", *base, *RUN, f"hydra.run.dir={root / 'single'}")
    (root / "ddp").mkdir()
    torchrun("train", *base, *RUN, cwd=root / "ddp")
    return root, base


def numbers(run: Path) -> list[float]:
    """Every training and validation figure of a run, in order, then its test loss and accuracy."""
    m = json.loads((run / "metrics.json").read_text())
    out = [v for st in m["stages"] for h in st["history"] for k, v in h.items() if k.startswith(("train_", "valid_"))]
    return out + [m["test"]["loss"], m["test"]["acc"]]


def test_two_ranks_train_like_one_process_with_the_same_global_batch(runs):
    root, _ = runs
    [ddp] = (root / "ddp" / "runs" / "train").iterdir()
    single, distributed = numbers(root / "single"), numbers(ddp)
    assert len(single) == len(distributed) > 10
    # Within float rounding: the two ranks sum their halves' gradients in another order.
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(single, distributed)), \
        list(zip(single, distributed))
    assert json.loads((ddp / "metrics.json").read_text())["test"]["acc"] == \
        json.loads((root / "single" / "metrics.json").read_text())["test"]["acc"]


def test_eval_under_torchrun_splits_the_test_set_and_reports_it_once(runs, tmp_path):
    root, _ = runs
    student = root / "single" / "checkpoints" / "student.pt"
    options = [f"checkpoint={student}", f"data.root={root / 'data'}", "device=cpu"]
    alone = fitnets("eval", *options).stdout
    together = torchrun("eval", *options, cwd=tmp_path).stdout
    row = lambda out: [line for line in out.splitlines() if line.startswith("│ fitnet_mnist")]
    assert len(row(together)) == 1 and row(together) == row(alone)


def test_all_ranks_share_one_run_directory_and_only_rank_0_writes(runs):
    root, _ = runs
    runs_made = list((root / "ddp").rglob("metrics.json"))
    assert len(runs_made) == 1, runs_made            # ${now:...} resolved once, not once per rank
    run = runs_made[0].parent
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "regressor-conv4.pt", "student.pt"]
    assert not list(run.rglob("*.tmp")) and sorted(p.name for p in (run / ".hydra").iterdir()) == \
        ["config.yaml", "hydra.yaml", "overrides.yaml"]
    # TensorBoard names its files after the writing process: a single writer pid.
    pids = {p.name.split(".")[4] for p in (run / "tb").rglob("events.out.tfevents.*")}
    assert len(pids) == 1, pids


def test_a_distributed_run_resumes_after_sigterm(runs, tmp_path):
    root, base = runs
    run = tmp_path / "run"
    longer = ["recipe.student.max_epochs=6"]
    proc = torchrun("train", *base, *RUN, *longer, f"hydra.run.dir={run}", cwd=tmp_path, wait=False)
    last, deadline = run / "checkpoints" / "last.pt", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            state = torch.load(last, weights_only=True) if last.exists() else None
        except Exception:
            state = None
        if state is not None and state["stage"] == 0 and state["at"] and state["at"]["epoch"] >= 2:
            proc.send_signal(signal.SIGTERM)   # torchrun passes it on to both ranks
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and not (run / "metrics.json").exists(), out + err
    assert f"Resume with: fitnets train resume={run}" in err
    torchrun("train", f"resume={run}", cwd=tmp_path)
    torchrun("train", *base, *RUN, *longer, f"hydra.run.dir={tmp_path / 'reference'}", cwd=tmp_path)
    resumed, reference = numbers(run), numbers(tmp_path / "reference")
    assert len(resumed) == len(reference) and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)
                                                  for a, b in zip(resumed, reference)), list(zip(resumed, reference))


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


def test_a_joblib_sweep_of_two_jobs_completes_and_compare_reads_it(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    fitnets("train", "-m", *tiny, "student=fitnet_mnist", "schedule=backprop", "seed=0,1",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}")
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "1"]
    rows = json.loads(fitnets("compare", f"runs={sweep}", "speed.enabled=false", "format=json").stdout)
    assert [(r["model"], r["schedule"], r["seeds"]) for r in rows] == [("fitnet_mnist", "backprop", 2)]


def test_the_slurm_preset_composes_onto_submitit():
    from hydra import compose, initialize_config_module
    with initialize_config_module("fitnets_cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1
    assert launcher.partition == "gpu"


def test_jobs_of_a_parallel_sweep_spread_over_the_gpus():
    from fitnets_cli.dist import gpu_index
    assert [gpu_index(4, job) for job in range(6)] == [0, 1, 2, 3, 0, 1]
    assert gpu_index(4, None) == 0
