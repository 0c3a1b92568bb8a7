"""The real entry point, run as a user runs it, on tiny MNIST files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


from conftest import fitnets


def test_help_lists_the_commands_and_the_config_groups():
    out = fitnets("--help").stdout
    assert all(c in out for c in ("train-teacher", "train", "eval", "compare"))
    out = fitnets("train", "--help").stdout
    assert "schedule: backprop, crd_fitnet, fitnets, hint_joint, kd" in out and "student:" in out


def test_cfg_job_prints_the_composed_config():
    out = fitnets("train", "student=fitnet1", "--cfg", "job").stdout
    assert "name: fitnet1" in out and "guided: conv6" in out


def test_teacher_then_fitnet_student_then_eval_and_compare(tiny, tiny_mnist, tmp_path):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    fitnets("train-teacher", *tiny, f"hydra.run.dir={teacher_dir}")
    assert (tmp_path / "teachers" / "maxout-mnist.pt").is_file()
    out = fitnets("train", *tiny, "student=fitnet_mnist", f"hydra.run.dir={student_dir}").stdout
    assert "hint plan" in out and "4x4x16" in out and "1x1 conv, maxout x2" in out   # guided conv4 -> hint conv2
    metrics = json.loads((student_dir / "metrics.json").read_text())
    assert [s["name"] for s in metrics["stages"]] == ["hint:conv4<-conv2", "kd"]
    assert [s["epochs"] for s in metrics["stages"]] == [2, 2]
    assert metrics["stages"][1]["history"][0]["lam"] == 4.0
    assert 0 <= metrics["test"]["acc"] <= 1 and metrics["params"] > 0
    for f in ("checkpoints/student.pt", "checkpoints/regressor-conv4.pt", "config_resolved.yaml", ".hydra/config.yaml"):
        assert (student_dir / f).is_file(), f
    assert list((student_dir / "tb").glob("events.out.tfevents.*"))
    state = torch.load(student_dir / "checkpoints" / "student.pt", weights_only=True)["state_dict"]
    assert not any(k.startswith("regressor") for k in state)        # the regressor is kept apart

    out = fitnets("eval", f"checkpoint={student_dir / 'checkpoints' / 'student.pt'}", f"data.root={tiny_mnist}").stdout
    assert f"{metrics['test']['acc']:.2%}" in out

    out = fitnets("compare", f"runs=[{teacher_dir},{student_dir}]", "speed.enabled=false").stdout
    assert "maxout" in out and "fitnet_mnist │ fitnets" in out and "361.07K" in out


def test_backprop_needs_no_teacher_and_a_two_job_multirun_works(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    fitnets("train", "-m", *tiny, "student=fitnet_mnist", "schedule=backprop", "seed=0,1", f"hydra.sweep.dir={sweep}")
    runs = sorted(sweep.glob("*/metrics.json"))
    assert len(runs) == 2
    assert [json.loads(r.read_text())["seed"] for r in runs] == [0, 1]
    rows = json.loads(fitnets("compare", f"runs={sweep}", "speed.enabled=false", "format=json").stdout)
    assert [(r["model"], r["schedule"], r["seeds"]) for r in rows] == [("fitnet_mnist", "backprop", 2)]


def test_missing_teacher_names_the_command_that_trains_it(tiny, tmp_path):
    proc = fitnets("train", *tiny, "student=fitnet_mnist", f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fitnets train-teacher teacher=maxout dataset=mnist" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    proc = fitnets("eval", check=False)
    assert proc.returncode == 2 and "eval needs checkpoint=PATH" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_on_cuda(tiny, tmp_path):
    cuda = [o for o in tiny if not o.startswith("device=")] + ["device=cuda"]
    fitnets("train", *cuda, "student=fitnet_mnist", "schedule=backprop", f"hydra.run.dir={tmp_path / 'r'}")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["device"].startswith("cuda")


def test_a_plain_non_editable_install_finds_its_configs(tmp_path):
    repo = Path(__file__).parents[1]
    source = tmp_path / "source"      # a copy, so the build leaves nothing behind in the checkout
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "src", "conf"):
        if (repo / part).is_dir():
            shutil.copytree(repo / part, source / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(repo / part, source / part)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), source],
                   check=True, capture_output=True, timeout=600)
    assert (target / "fitnets_cli" / "conf" / "student" / "fitnet4.yaml").is_file()
    assert (target / "fitnets_cli" / "assets" / "mnist_subset.npz").is_file()
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", "import fitnets_cli, runpy; print(fitnets_cli.__file__); "
                           "import sys; sys.argv = ['fitnets', 'compare', 'students=[fitnet1]', 'counting=paper', "
                           "'speed.enabled=false', 'format=csv']; "
                           "runpy.run_module('fitnets_cli', run_name='__main__')"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout and "fitnet1,,,cifar10,,11,249576,30150024" in proc.stdout
