"""Resume, signals, atomic outputs, a full disk, bad input and provenance, through the real entry point."""

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from fitnets_cli.commands.compare import load_student
from fitnets_cli.networks.maxout import build_net
from fitnets_cli.runtime import files
from fitnets_cli.runtime.files import DiskFull, atomic_write, write_json
from helpers import call, failure, in_stage, main, signal_when, stage_of, start, without_timing

# Five epochs a stage leave room to stop a run in stage 1, at the boundary and in stage 2.
RUN = ["student=fitnet_mnist", "schedule=fitnets", "recipe.student.max_epochs=5", "recipe.student.batch_size=8",
       "recipe.student.patience=5", "deterministic=true"]


class Setup(NamedTuple):
    root: Path              # the shared teacher's: data, teacher run and teacher store
    base: list[str]         # the overrides that run on them
    reference: Path         # RUN, not interrupted


@pytest.fixture(scope="module")
def setup(teacher, tmp_path_factory) -> Setup:
    """The shared tiny teacher, and the reference run that nobody interrupts."""
    root, base = teacher
    reference = tmp_path_factory.mktemp("reliable") / "reference"
    call("train", *base, *RUN, f"hydra.run.dir={reference}")
    return Setup(root, base, reference)


def outcome(run):
    metrics = json.loads((run / "metrics.json").read_text())
    for part in metrics["stages"] + metrics.get("retrain", []):
        part["history"] = without_timing(part["history"])
    state = torch.load(run / "checkpoints" / "student.pt", weights_only=True)["state_dict"]
    return {k: metrics[k] for k in ("stages", "test", "test_last")}, state


def assert_same_run(a, b):
    (ma, sa), (mb, sb) = outcome(a), outcome(b)
    assert ma == mb
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def interrupt_when(setup, tmp_path, condition, sig, extra=()):
    """Start RUN in tmp_path/run and send `sig` once its checkpoint satisfies `condition`."""
    base = setup.base
    run = tmp_path / "run"
    proc = start("train", *base, *RUN, *extra, f"hydra.run.dir={run}")
    signal_when(proc, run / "checkpoints" / "last.pt", condition, sig)
    out, err = proc.communicate(timeout=300)
    assert not (run / "metrics.json").exists(), "the run finished before it could be interrupted"
    return run, proc.returncode, err


@pytest.mark.slow
def test_sigterm_in_stage_one_checkpoints_mid_epoch_and_resumes_exactly(setup, tmp_path):
    run, rc, err = interrupt_when(setup, tmp_path, lambda s: stage_of(s) == 0 and in_stage(s) and in_stage(s)["epoch"] >= 2,
                                  signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM
    assert f"Resume with: fitnets train resume={run}" in err
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert stage_of(state) == 0 and in_stage(state)["batch"] > 0       # inside an epoch
    call("train", f"resume={run}")
    assert_same_run(setup.reference, run)


@pytest.mark.slow
def test_sigkill_at_the_stage_boundary_resumes_exactly(setup, tmp_path):
    run, rc, _ = interrupt_when(setup, tmp_path, lambda s: stage_of(s) == 1 and not in_stage(s), signal.SIGKILL)
    assert rc == -signal.SIGKILL
    call("train", f"resume={run}")
    assert_same_run(setup.reference, run)


@pytest.mark.slow
def test_sigkill_in_stage_two_resumes_exactly_and_a_finished_run_is_left_alone(setup, tmp_path):
    run, rc, _ = interrupt_when(setup, tmp_path, lambda s: stage_of(s) == 1 and in_stage(s) and in_stage(s)["epoch"] >= 3,
                                signal.SIGKILL)
    assert rc == -signal.SIGKILL
    call("train", f"resume={run}")
    assert_same_run(setup.reference, run)
    before = (run / "metrics.json").read_bytes()
    assert "already finished" in main("train", f"resume={run}")
    assert "never overwritten" in failure("train", *setup.base, *RUN, f"hydra.run.dir={run}")
    assert (run / "metrics.json").read_bytes() == before


@pytest.mark.slow
def test_a_kill_while_retraining_with_augmentation_resumes_exactly(setup, tmp_path):
    base = setup.base
    extra = ["recipe.retrain_full=true", "dataset.augment.flip=true", "dataset.augment.pad=2",
             "recipe.student.max_epochs=4", "recipe.student.patience=4"]
    call("train", *base, *RUN, *extra, f"hydra.run.dir={tmp_path / 'reference'}")
    run, rc, _ = interrupt_when(setup, tmp_path, lambda s: s["progress"]["phase"] == 1 and in_stage(s) and in_stage(s)["epoch"] >= 1,
                                signal.SIGKILL, extra)
    assert rc == -signal.SIGKILL
    call("train", f"resume={run}")
    assert_same_run(tmp_path / "reference", run)
    assert [r["name"] for r in json.loads((run / "metrics.json").read_text())["retrain"]] == [
        "retrain/hint:conv4<-conv2", "retrain/kd"]


@pytest.mark.slow
def test_a_finished_teacher_is_left_alone_and_resumed_only_by_its_own_command(teacher):
    # That two deterministic runs are identical the resume tests above show: each resumed run can equal the
    # reference only if training is deterministic.
    root, _ = teacher
    assert "already finished" in main("train-teacher", f"resume={root / 'teacher'}")
    assert "fitnets train-teacher resume=" in failure("train", f"resume={root / 'teacher'}")


def test_a_crash_mid_write_leaves_the_previous_file_valid(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"epoch": 1})

    def crash(tmp):
        tmp.write_text('{"epoch": 2, "trunc')
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"epoch": 1}


# ---------------------------------------------------------------- a full disk

BACKPROP = ["student=fitnet_mnist", "schedule=backprop", "recipe.student.max_epochs=3"]


def checkpoint_files(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture
def tmpfs(tmp_path):
    """mount(kib): a tmpfs of that size at tmp_path/disk (root only; skipped where mounting is not allowed),
    remounted larger by calling it again, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(kib):
        options = ["-o", f"remount,size={kib}k"] if mounted else ["-o", f"size={kib}k"]
        proc = subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs", str(disk)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(kib)
        return disk

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    if mounted:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_in_one_line_and_the_run_resumes_from_its_last_checkpoint(setup, tmpfs):
    base = setup.base
    net = build_net(load_student("fitnet_mnist").layers, (1, 28, 28), 10)
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    # An epoch's checkpoint holds the weights three times (weights, RMSProp state, best weights), and the atomic
    # write holds the old checkpoint and the new one at once: beside the run's small files (about 40 KiB) the
    # disk takes the first epoch's checkpoint and fails the second's.
    run = tmpfs((64 * 1024 + int(4.5 * weights)) // 1024) / "run"
    line = failure("train", *base, *BACKPROP, f"hydra.run.dir={run}")
    assert f"the disk is full: could not write {run / 'checkpoints' / 'last.pt'} (" in line
    assert re.search(r"\(\d+(\.\d)? (bytes|KiB) free there, and it needs more than \d+\.\d KiB\)", line), line
    assert line.endswith(f"continue the run with: fitnets train resume={run}")
    assert checkpoint_files(run) == ["last.pt"]                       # no temporary file left behind
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (stage_of(state), in_stage(state)["epoch"], in_stage(state)["batch"]) == (0, 1, 0)   # after epoch 0
    tmpfs(4096)
    call("train", f"resume={run}")
    assert [s["epochs"] for s in json.loads((run / "metrics.json").read_text())["stages"]] == [3]


@pytest.mark.slow
def test_a_write_that_finds_no_space_reports_it_and_keeps_the_previous_file(setup, tmp_path, monkeypatch):
    """The same without root: the second epoch's checkpoint write fails with ENOSPC."""
    real_save, saved = torch.save, []

    def save(obj, f, *args, **kwargs):
        if ".last.pt." in str(f):
            saved.append(f)
            if len(saved) == 2:
                f.write_bytes(b"half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    line = failure("train", *setup.base, *BACKPROP, f"hydra.run.dir={run}")
    assert f"the disk is full: could not write {run / 'checkpoints' / 'last.pt'} (" in line
    assert "it needs more than 17 bytes" in line and line.endswith(f"fitnets train resume={run}")
    assert checkpoint_files(run) == ["last.pt"]
    assert in_stage(torch.load(run / "checkpoints" / "last.pt", weights_only=True))["epoch"] == 1


def test_torchs_errno_less_write_failure_is_told_from_other_errors_by_the_free_space(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    atomic_write(target, lambda tmp: torch.save({"epoch": 1}, tmp))

    def torch_out_of_space(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    real_usage = files.shutil.disk_usage
    with pytest.raises(RuntimeError, match="unexpected pos"):     # space left: not reported as a full disk
        atomic_write(target, torch_out_of_space)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=4096))
    with pytest.raises(DiskFull, match=re.escape(f"could not write {target} (4.0 KiB free there, and it needs more "
                                                 "than 7 bytes); free some space there")):
        atomic_write(target, torch_out_of_space)
    assert torch.load(target, weights_only=True) == {"epoch": 1} and os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.slow
def test_a_nan_loss_stops_with_the_stage_epoch_and_term_and_keeps_the_last_checkpoint(setup, tmp_path):
    base = setup.base
    run = tmp_path / "nan"
    line = failure("train", *base, "student=fitnet_mnist", "schedule=backprop", "recipe.student.lr=1e30",
                   "recipe.student.optimizer=sgd", "recipe.student.max_epochs=3", f"hydra.run.dir={run}")
    assert "stage ce, epoch" in line and "ce loss is" in line and "checkpoint is kept" in line
    assert not (run / "metrics.json").exists()


def files_of(*paths):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for path in paths for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["student=fitnet99"], "Could not find 'student/fitnet99' Available options in 'student': MobileNetV2,"),
    (["teacher=resnet99"], "Could not find 'teacher/resnet99' Available options in 'teacher': MobileNetV2,"),
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
    (["hydra/launcher=ray"], "come with `pip install '.[cluster]'`, run in the root of the fitnets clone"),
])
def test_bad_input_exits_with_one_line_and_writes_nothing(setup, tmp_path, args, message):
    root, base, reference = setup
    before = files_of(root, reference)
    assert message in failure("train", *base, "student=fitnet_mnist", f"hydra.run.dir={tmp_path / 'bad'}", *args)
    assert files_of(root, reference) == before


@pytest.mark.slow
def test_foreign_and_corrupted_checkpoints_are_refused(setup, tmp_path):
    root, base, reference = setup
    teacher = root / "teacher" / "checkpoints" / "teacher.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(teacher.read_bytes()[:1000])
    before = files_of(root, reference)
    assert "corrupted or not a fitnets checkpoint" in failure("eval", f"checkpoint={truncated}")
    assert "does not exist" in failure("eval", f"checkpoint={tmp_path / 'missing.pt'}")
    for args, message in (([f"teacher.checkpoint={truncated}"], "corrupted"),
                          ([f"teacher.checkpoint={reference / 'checkpoints' / 'student.pt'}"],
                           "another architecture")):
        assert message in failure("train", *base, "student=fitnet_mnist", f"hydra.run.dir={tmp_path / 'x'}", *args)
    assert files_of(root, reference) == before


@pytest.mark.slow
def test_eval_prints_the_provenance(setup):
    root, base, reference = setup
    teacher_file = root / "teachers" / "maxout-mnist.pt"
    out = main("eval", f"checkpoint={reference / 'checkpoints' / 'student.pt'}", base[1])
    assert f"torch {version('torch')}" in out
    assert hashlib.sha256(teacher_file.read_bytes()).hexdigest() in out
    assert "split seed 0" in out and "student:" in out


def test_provenance_of_a_source_tree_that_was_never_installed(monkeypatch, make_config):
    # Runs started with PYTHONPATH=src have no fitnets-cli metadata; they must still finish.
    from importlib.metadata import PackageNotFoundError

    from fitnets_cli.training import rundir

    def fake_version(package):
        if package == "fitnets-cli":
            raise PackageNotFoundError(package)
        return version(package)

    monkeypatch.setattr(rundir, "version", fake_version)
    made = rundir.provenance(make_config("train", ["dataset=mnist_subset", "student=fitnet_mnist"]))
    assert made["versions"]["fitnets-cli"] is None
    assert made["versions"]["torch"] == version("torch")
