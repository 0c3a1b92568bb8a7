"""Resume, signals, atomic outputs, bad input and provenance, through the real entry point."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version

import pytest
import torch

from conftest import fitnets
from fitnets_cli.checkpoint import atomic_write, write_json

RUN = ["student=fitnet_mnist", "schedule=fitnets", "recipe.student.max_epochs=10", "recipe.student.batch_size=8",
       "recipe.student.patience=10", "deterministic=true"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny MNIST, a trained teacher, and the reference run that nobody interrupts."""
    from conftest import tiny_teacher
    root = tmp_path_factory.mktemp("reliable")
    base = tiny_teacher(root)
    fitnets("train", *base, *RUN, f"hydra.run.dir={root / 'reference'}")
    return root, base


def outcome(run):
    metrics = json.loads((run / "metrics.json").read_text())
    for part in metrics["stages"] + metrics.get("retrain", []):
        for h in part["history"]:
            h.pop("epoch_s")
    state = torch.load(run / "checkpoints" / "student.pt", weights_only=True)["state_dict"]
    return {k: metrics[k] for k in ("stages", "test", "test_last")}, state


def assert_same_run(a, b):
    (ma, sa), (mb, sb) = outcome(a), outcome(b)
    assert ma == mb
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def interrupt_when(setup, tmp_path, condition, sig, extra=()):
    root, base = setup
    run = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "fitnets_cli", "train", *base, *RUN, *extra, f"hydra.run.dir={run}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            try:
                state = torch.load(last, weights_only=True)
            except Exception:
                state = None
            if state is not None and condition(state):
                proc.send_signal(sig)
                break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=300)
    assert not (run / "metrics.json").exists(), "the run finished before it could be interrupted"
    return run, proc.returncode, err


def test_sigterm_in_stage_one_checkpoints_mid_epoch_and_resumes_exactly(setup, tmp_path):
    run, rc, err = interrupt_when(setup, tmp_path, lambda s: s["stage"] == 0 and s["at"] and s["at"]["epoch"] >= 2,
                                  signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM
    assert f"Resume with: fitnets train resume={run}" in err
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["stage"] == 0 and state["at"]["batch"] > 0            # inside an epoch
    fitnets("train", f"resume={run}")
    assert_same_run(setup[0] / "reference", run)


def test_sigkill_at_the_stage_boundary_resumes_exactly(setup, tmp_path):
    run, rc, _ = interrupt_when(setup, tmp_path, lambda s: s["stage"] == 1 and s["at"] is None, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    fitnets("train", f"resume={run}")
    assert_same_run(setup[0] / "reference", run)


def test_sigkill_in_stage_two_resumes_exactly_and_a_finished_run_is_left_alone(setup, tmp_path):
    run, rc, _ = interrupt_when(setup, tmp_path, lambda s: s["stage"] == 1 and s["at"] and s["at"]["epoch"] >= 3,
                                signal.SIGKILL)
    assert rc == -signal.SIGKILL
    fitnets("train", f"resume={run}")
    assert_same_run(setup[0] / "reference", run)
    before = (run / "metrics.json").read_bytes()
    proc = fitnets("train", f"resume={run}")
    assert "already finished" in proc.stdout and (run / "metrics.json").read_bytes() == before
    proc = fitnets("train", *setup[1], *RUN, f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2 and "never overwritten" in proc.stderr
    assert (run / "metrics.json").read_bytes() == before


def test_a_kill_while_retraining_with_augmentation_resumes_exactly(setup, tmp_path):
    root, base = setup
    extra = ["recipe.retrain_full=true", "dataset.augment.flip=true", "dataset.augment.pad=2",
             "recipe.student.max_epochs=4", "recipe.student.patience=4"]
    fitnets("train", *base, *RUN, *extra, f"hydra.run.dir={tmp_path / 'reference'}")
    run, rc, _ = interrupt_when(setup, tmp_path, lambda s: s["phase"] == 1 and s["at"] and s["at"]["epoch"] >= 1,
                                signal.SIGKILL, extra)
    assert rc == -signal.SIGKILL
    fitnets("train", f"resume={run}")
    assert_same_run(tmp_path / "reference", run)
    assert [r["name"] for r in json.loads((run / "metrics.json").read_text())["retrain"]] == [
        "retrain/hint:conv4<-conv2", "retrain/kd"]


def test_two_deterministic_runs_are_identical_and_the_teacher_resumes_too(setup, tmp_path):
    root, base = setup
    fitnets("train", *base, *RUN, f"hydra.run.dir={tmp_path / 'again'}")
    assert_same_run(root / "reference", tmp_path / "again")
    proc = fitnets("train-teacher", f"resume={root / 'teacher'}")
    assert "already finished" in proc.stdout
    proc = fitnets("train", f"resume={root / 'teacher'}", check=False)
    assert proc.returncode == 2 and "fitnets train-teacher resume=" in proc.stderr


def test_a_crash_mid_write_leaves_the_previous_file_valid(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"epoch": 1})

    def crash(tmp):
        tmp.write_text('{"epoch": 2, "trunc')
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"epoch": 1}


def test_a_nan_loss_stops_with_the_stage_epoch_and_term_and_keeps_the_last_checkpoint(setup, tmp_path):
    root, base = setup
    run = tmp_path / "nan"
    proc = fitnets("train", *base, "student=fitnet_mnist", "schedule=backprop", "recipe.student.lr=1e30",
                   "recipe.student.optimizer=sgd", "recipe.student.max_epochs=3", f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "stage ce, epoch" in line and "ce loss is" in line and "checkpoint is kept" in line
    assert not (run / "metrics.json").exists()


def files_of(path):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args,message", [
    (["student=fitnet99"], "Available options in 'student': depth11_107m"),
    (["recipe.student.lrr=1"], "Key 'lrr' not in 'Optim'"),
    (["recipe.student.batch_size=big"], "could not be converted to Integer"),
    (["recipe.student.max_epochs=0"], "max_epochs must be > 0"),
    (["recipe.student.batch_size=-4"], "batch_size must be > 0"),
    (["recipe.kd.tau=0"], "tau must be > 0"),
    (["student.guided=conv9"], "guided layer 'conv9' does not exist; closest: conv1"),
    (["hints.pairs=[{hint: conv1, guided: conv4}]"], "no unpadded regressor can join them"),
    (["teacher_store=/nonexistent/store"], "train one with `fitnets train-teacher teacher=maxout dataset=mnist`"),
    (["data.root=/nonexistent/data"], "data.download=true"),
    (["hydra.run.dir=/dev/null/run"], "cannot write the output directory"),
])
def test_bad_input_exits_with_one_line_and_writes_nothing(setup, tmp_path, args, message):
    root, base = setup
    before = files_of(root)
    proc = fitnets("train", *base, "student=fitnet_mnist", f"hydra.run.dir={tmp_path / 'bad'}", *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert files_of(root) == before


def test_foreign_and_corrupted_checkpoints_are_refused(setup, tmp_path):
    root, base = setup
    teacher = root / "teacher" / "checkpoints" / "teacher.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(teacher.read_bytes()[:1000])
    before = files_of(root)
    for args, message in (([f"checkpoint={truncated}"], "corrupted or not a fitnets checkpoint"),
                          ([f"checkpoint={tmp_path / 'missing.pt'}"], "does not exist")):
        proc = fitnets("eval", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    for args, message in (([f"teacher.checkpoint={truncated}"], "corrupted"),
                          ([f"teacher.checkpoint={root / 'reference' / 'checkpoints' / 'student.pt'}"],
                           "another architecture")):
        proc = fitnets("train", *base, "student=fitnet_mnist", f"hydra.run.dir={tmp_path / 'x'}", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert files_of(root) == before


def test_eval_prints_the_provenance(setup):
    root, base = setup
    teacher_file = root / "teachers" / "maxout-mnist.pt"
    proc = fitnets("eval", f"checkpoint={root / 'reference' / 'checkpoints' / 'student.pt'}", base[1])
    assert f"torch {version('torch')}" in proc.stdout
    assert hashlib.sha256(teacher_file.read_bytes()).hexdigest() in proc.stdout
    assert "split seed 0" in proc.stdout and "student:" in proc.stdout


def test_provenance_of_a_source_tree_that_was_never_installed(monkeypatch, make_config):
    # Runs started with PYTHONPATH=src have no fitnets-cli metadata; they must still finish.
    from importlib.metadata import PackageNotFoundError

    from fitnets_cli import train

    def fake_version(package):
        if package == "fitnets-cli":
            raise PackageNotFoundError(package)
        return version(package)

    monkeypatch.setattr(train, "version", fake_version)
    made = train.provenance(make_config("train", ["dataset=mnist_subset", "student=fitnet_mnist"]))
    assert made["versions"]["fitnets-cli"] is None
    assert made["versions"]["torch"] == version("torch")
