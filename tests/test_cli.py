"""The real entry point, run as a user runs it, on tiny MNIST files."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fitnets_cli import api
from helpers import failure, fitnets, main


@pytest.mark.slow
def test_help_lists_the_commands_and_the_config_groups():
    out = fitnets("--help").stdout
    assert all(c in out for c in ("train-teacher", "train", "eval", "compare"))
    out = fitnets("train", "--help").stdout
    assert "schedule: at, at_kd, backprop, crd_fitnet, dkd, fitnets, hint_joint, kd, pkt, sp" in out and "student:" in out


def test_cfg_job_prints_the_composed_config():
    out = fitnets("train", "student=fitnet1", "--cfg", "job").stdout
    assert "name: fitnet1" in out and "guided: conv6" in out


def test_cfg_job_composes_the_zoo_pair_by_its_short_names():
    out = main("train", "student=resnet8x4", "teacher=resnet32x4", "dataset=mnist_subset", "--cfg", "job")
    assert "arch: resnet8x4" in out and "arch: resnet32x4" in out and "source: zoo" in out


@pytest.mark.parametrize("flags", [["--cfg", "job"], ["--cfg", "job", "--resolve"], ["--help"], []])
def test_a_bad_option_stops_in_one_line_with_or_without_cfg(flags, tmp_path):
    line = failure("train", "student=resnet9", *flags, f"hydra.run.dir={tmp_path / 'r'}")
    assert "Could not find 'student/resnet9'" in line and "resnet8x4" in line   # the options, zoo's among them
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command,extra", [("export", ["checkpoint=x.pt"]), ("layers", [])])
def test_device_is_refused_where_it_would_do_nothing(command, extra):
    line = failure(command, "device=cuda", *extra)
    assert "device" in line and "`fitnets train`" in line and "`fitnets eval`" in line


@pytest.mark.slow
def test_teacher_then_fitnet_student_then_eval_and_compare(teacher, fitnet):
    root, base = teacher        # trained by `fitnets train-teacher`, the student by `fitnets train` (conftest)
    teacher_run, (student_run, out) = root / "teacher", fitnet
    assert (root / "teachers" / "maxout-mnist.pt").is_file()
    assert [s["epochs"] for s in json.loads((teacher_run / "metrics.json").read_text())["stages"]] == [2]
    assert "hint plan" in out and "4x4x16" in out and "1x1 conv, maxout x2" in out   # guided conv4 -> hint conv2
    metrics = json.loads((student_run / "metrics.json").read_text())
    assert [s["name"] for s in metrics["stages"]] == ["hint:conv4<-conv2", "kd"]
    assert [s["epochs"] for s in metrics["stages"]] == [2, 2]
    assert [len(s["history"]) for s in metrics["stages"]] == [2, 2]
    assert [h["lam"] for h in metrics["stages"][1]["history"]] == [4.0, pytest.approx(4 - 3 / 149)]
    for f in ("checkpoints/student.pt", "checkpoints/regressor-conv4.pt", "config_resolved.yaml", ".hydra/config.yaml"):
        assert (student_run / f).is_file(), f
    assert list((student_run / "tb").glob("events.out.tfevents.*"))
    state = torch.load(student_run / "checkpoints" / "student.pt", weights_only=True)["state_dict"]
    assert not any(k.startswith("regressor") for k in state)        # the regressor is kept apart
    assert metrics["params"] == sum(v.numel() for v in state.values())

    out = fitnets("eval", f"checkpoint={student_run / 'checkpoints' / 'student.pt'}", base[1]).stdout
    [row] = [line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│ fitnet_mnist")]
    test = metrics["test"]      # 50 test images: accuracy in steps of 2%, exact at two decimals
    assert [c.strip() for c in row] == ["fitnet_mnist", "student", "mnist", "mnist", f"{test['acc']:.2%}",
                                        f"{test['error']:.2%}", f"{test['loss']:.4f}"]

    out = fitnets("compare", f"runs=[{teacher_run},{student_run}]", "speed.enabled=false").stdout
    assert "maxout" in out and "fitnet_mnist │ fitnets" in out and "361.07K" in out


@pytest.mark.slow
def test_missing_teacher_names_the_command_that_trains_it(tiny, tmp_path):
    proc = fitnets("train", *tiny, "student=fitnet_mnist", f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fitnets train-teacher teacher=maxout dataset=mnist" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "eval needs checkpoint=PATH" in failure("eval")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_on_cuda(tiny, tmp_path):
    cuda = [o for o in tiny if not o.startswith("device=")] + ["device=cuda"]
    fitnets("train", *cuda, "student=fitnet_mnist", "schedule=backprop", f"hydra.run.dir={tmp_path / 'r'}")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["device"].startswith("cuda")


@pytest.mark.slow
def test_the_wheel_ships_every_config_and_a_plain_install_runs_from_it(tmp_path):
    repo = Path(__file__).parents[1]
    source = tmp_path / "source"      # a clean copy: a stale egg-info in the checkout would list files for the build
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "src", "conf"):
        if (repo / part).is_dir():
            shutil.copytree(repo / part, source / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(repo / part, source / part)
    pip = [sys.executable, "-m", "pip", "--quiet"]
    # The environment's setuptools (the test extra's), so the build needs no index.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), source],
                   check=True, capture_output=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("fitnets_cli-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fitnets_cli/conf/")}
    configs = {f"fitnets_cli/conf/{p.relative_to(repo / 'conf').as_posix()}" for p in (repo / "conf").rglob("*.yaml")}
    assert "fitnets_cli/conf/hydra/launcher/slurm.yaml" in configs and configs <= shipped, configs - shipped
    assert "fitnets_cli/assets/mnist_subset.npz" in zipfile.ZipFile(wheel).namelist()

    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), wheel], check=True, capture_output=True,
                   timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", "import fitnets_cli, runpy; print(fitnets_cli.__file__); "
                           "import sys; sys.argv = ['fitnets', 'compare', 'students=[fitnet1]', 'counting=paper', "
                           "'speed.enabled=false', 'format=csv']; "
                           "runpy.run_module('fitnets_cli', run_name='__main__')"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout and "fitnet1,,,,cifar10,,11,249576,30150024" in proc.stdout   # no teacher, schedule, variant


@pytest.mark.parametrize("args,says", [
    (["-m", "hydra/sweeper=optuna", "hydra.sweeper.params.recipe.student.lr=interval(0.01,0.1)"],
     "give the Optuna sweeper the search space as a plain override: -m hydra/sweeper=optuna "
     "'recipe.student.lr=interval(0.01,0.1)'"),
    (["-m", "hydra.job.chdir=true,false"], "Hydra cannot sweep over its own settings; give hydra.job.chdir one value"),
    (["seed=0,1"], "seed=0,1 is a sweep: add -m (fitnets train -m seed=0,1)"),
    (["-m", "seed=0,1", "--cfg", "job"], "-m and --cfg do not go together"),
    (["-m", "hydra/sweeper=optunaa"], "Could not find 'hydra/sweeper/optunaa' Available options in 'hydra/sweeper': "),
    (["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=many"], "hydra.sweeper.n_trials=many"),
    (["-m", "hydra/sweeper=optuna", "hydra.sweeper.trials=3"], "Key 'trials' not in 'OptunaSweeperConf'"),
])
def test_hydras_own_errors_reach_the_user_as_one_line(args, says, tmp_path):
    line = failure("train", "schedule=backprop", *args, f"hydra.sweep.dir={tmp_path / 's'}",
                   f"hydra.run.dir={tmp_path / 'r'}")
    assert says in line, line
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_m_may_come_after_the_overrides(tmp_path, monkeypatch):
    # Hydra's parser takes its flags before the overrides only; the command line puts them there.
    ran = []
    monkeypatch.setattr(api, "train", lambda cfg, **kw: ran.append(cfg.seed) or {"stages": [{"best_valid": 0.5}]})
    main("train", "schedule=backprop", "seed=0,1", "-m", f"hydra.sweep.dir={tmp_path / 's'}")
    assert ran == [0, 1]
