"""The student leaves the tool: `fitnets export` (each format round-trips and reproduces the checkpoint's logits;
bad input stops in one line), the Python API (the commands as functions, twice in one process; `load`), and
Optuna sweeps (the trials' objectives, the best, a failed trial)."""

import json
import sys

import pytest
import torch
from torch import nn

from fitnets_cli import api
from fitnets_cli.commands import export
from fitnets_cli.data.load import load_data
from fitnets_cli.networks.build import build_network
from fitnets_cli.networks.checkpoint import save_model
from helpers import failure, main, make_config, tiny_overrides, write_tiny_mnist


class UserNet(nn.Module):
    """A user's own small network."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


STUDENTS = {"maxout": ["student=fitnet_mnist"],
            "torchvision": ["student=torchvision", "student.arch=mobilenet_v3_small"],
            "module": ["student=module", "student._target_=test_export.UserNet"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny MNIST and a student checkpoint of each source, with weights moved off their initialisation (and
    batch-norm statistics off 0 and 1) so that a wrong load shows."""
    root = tmp_path_factory.mktemp("export")
    data = write_tiny_mnist(root / "data")
    checkpoints = {}
    for source, overrides in STUDENTS.items():
        cfg = make_config("train", tiny_overrides(data, root / "teachers") + overrides)
        torch.manual_seed(0)
        net = build_network(cfg.student, cfg.dataset.in_shape, cfg.dataset.num_classes)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
            net.train()(torch.rand(8, *cfg.dataset.in_shape))   # batch-norm running statistics
        path = root / source / "student.pt"
        save_model(path, net.eval(), role="student", name=cfg.student.name, dataset=cfg.dataset, config="",
                   metrics={}, provenance={"seed": 0})
        checkpoints[source] = path
    return data, checkpoints


def images_of(data):
    cfg = make_config("eval", [f"data.root={data}", "dataset=mnist", "dataset.valid_size=50"])
    return next(iter(load_data(cfg.dataset, cfg.data, torch.device("cpu")).test.batches(50)))[0]


def run_export(path, fmt, x):
    if fmt == "safetensors":
        from fitnets_cli.commands.export import run_safetensors
        return run_safetensors(path, x)
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    if fmt == "pt2":
        return torch.export.load(str(path)).module()(x)
    import onnxruntime
    return torch.from_numpy(onnxruntime.InferenceSession(str(path)).run(None, {"images": x.numpy()})[0])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "pt2", "onnx"])
@pytest.mark.parametrize("source", list(STUDENTS))
def test_each_format_round_trips_and_gives_the_checkpoints_logits(world, tmp_path, source, fmt):
    if fmt == "onnx":
        for module in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(module, reason=f"format=onnx needs {module} (pip install '.[export]')")
    data, checkpoints = world
    out = tmp_path / f"student.{fmt}"
    printed = main("export", f"checkpoint={checkpoints[source]}", f"format={fmt}", f"out={out}", f"data.root={data}")
    sidecar = json.loads((tmp_path / f"student.{fmt}.json").read_text())
    assert sidecar["input"]["shape"] == ["batch", 1, 28, 28] and sidecar["num_classes"] == 10
    assert sidecar["check"]["images"] == 50 and sidecar["check"]["max_abs_diff"] <= 1e-5
    assert sidecar["provenance"] == {"seed": 0} and "pixels scaled to [0, 1]" in printed
    # Read back here, on other images than the check's: the same logits as the rebuilt checkpoint.
    x = images_of(data)[10:30] + 0.01
    with torch.no_grad():
        assert torch.allclose(run_export(out, fmt, x), api.load(checkpoints[source])(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_bad_checkpoints_and_outputs_stop_in_one_line_and_damage_nothing(world, tmp_path, monkeypatch):
    data, checkpoints = world
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    assert "is corrupted or not a fitnets checkpoint" in failure("export", f"checkpoint={tmp_path / 'corrupt.pt'}")
    assert "is not a fitnets checkpoint" in failure("export", f"checkpoint={tmp_path / 'foreign.pt'}")
    (tmp_path / "file").write_text("a file, not a folder")
    line = failure("export", f"checkpoint={checkpoints['maxout']}", f"out={tmp_path / 'file' / 'student.pt2'}",
                   "format=pt2", f"data.root={data}")
    assert line.startswith(f"error: cannot write {tmp_path / 'file' / 'student.pt2'}") and "out=PATH" in line
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # as if the export extra were not installed
    line = failure("export", f"checkpoint={checkpoints['maxout']}", "format=onnx", f"data.root={data}")
    assert "format=onnx needs onnxruntime, which is not installed: pip install '.[export]'" in line
    # An export whose logits differ is never written, and an earlier file of that name is kept.
    monkeypatch.setitem(export.FORMATS, "torchscript",
                        (lambda net, x, path, payload: torch.jit.trace(nn.Linear(784, 10), x.flatten(1)).save(str(path)),
                         lambda path, x: torch.zeros(len(x), 10)))
    (tmp_path / "kept.pt").write_text("earlier")
    line = failure("export", f"checkpoint={checkpoints['maxout']}", "format=torchscript", f"out={tmp_path / 'kept.pt'}",
                   f"data.root={data}")
    assert "gives other logits than its checkpoint on 50 test images" in line, line
    assert (tmp_path / "kept.pt").read_text() == "earlier" and not list(tmp_path.glob(".kept.pt.*"))


@pytest.mark.slow
def test_the_api_runs_the_commands_twice_in_one_process_and_returns_what_the_cli_writes(tmp_path, monkeypatch):
    data = write_tiny_mnist(tmp_path / "data")
    base = tiny_overrides(data, tmp_path / "teachers") + ["recipe.student.max_epochs=1"]
    teacher = api.train_teacher(api.compose("train-teacher", base), tmp_path / "teacher")
    assert teacher == json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    results = {}
    for schedule in ("kd", "backprop"):
        cfg = api.compose("train", base + [f"schedule={schedule}", "seed=1"])
        results[schedule] = api.train(cfg, tmp_path / schedule)
        assert results[schedule] == json.loads((tmp_path / schedule / "metrics.json").read_text())
    assert results["kd"]["schedule"] == "kd" and results["backprop"]["schedule"] == "backprop"
    checkpoint = tmp_path / "kd" / "checkpoints" / "student.pt"
    evaluated = api.evaluate(api.compose("eval", [f"checkpoint={checkpoint}", f"data.root={data}", "device=cpu"]))
    assert evaluated == pytest.approx(results["kd"]["test"])
    # load: the same network as eval's, so the same accuracy on the test images.
    net, split = api.load(checkpoint), load_data(make_config("eval", [f"data.root={data}", "dataset=mnist", "dataset.valid_size=50"]).dataset,
                                                 make_config("eval", [f"data.root={data}"]).data, torch.device("cpu")).test
    x, y, _, _ = next(iter(split.batches(len(split))))
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean().item() == pytest.approx(evaluated["acc"])
    assert not net.training
    rows = api.compare(api.compose("compare", [f"runs=[{tmp_path / 'kd'},{tmp_path / 'backprop'}]", "speed.enabled=false"]))
    assert sorted(r["schedule"] for r in rows if r["role"] == "student") == ["backprop", "kd"]
    # With no run_dir, a new runs/<command>/<date_time>, never one that exists.
    monkeypatch.chdir(tmp_path)
    first = api.run_dir_for(cfg, None)
    first.mkdir(parents=True)
    assert first.parts[:2] == ("runs", "train") and api.run_dir_for(cfg, None) not in (first, None)
    with pytest.raises(api.ConfigError, match="holds a finished run"):
        api.train(api.compose("train", base + ["schedule=kd"]), tmp_path / "kd")
    with pytest.raises(api.ConfigError, match="Key 'format' not in 'TrainConfig'; format belongs to"):
        api.compose("train", ["format=csv"])


@pytest.mark.slow
def test_an_optuna_sweep_on_the_mnist_subset_minimises_the_trials_objectives(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the Optuna sweeper: pip install '.[optuna]'")
    import yaml

    sweep, store = tmp_path / "sweep", tmp_path / "teachers"
    quick = ["experiment=optuna_mnist_subset", f"teacher_store={store}", "recipe.student.max_epochs=1",
             "recipe.teacher.max_epochs=1", "device=cpu"]
    out = main("train", "-m", *quick, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}")
    trials = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(3)]
    objectives = [t["stages"][-1]["best_valid"] for t in trials]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(objectives) and f"Best value: {min(objectives)}" in out
    rows = json.loads(main("compare", f"runs={sweep}", "speed.enabled=false", "format=json"))
    assert sorted(r.get("test_acc") for r in rows if r["role"] == "student") == \
        sorted(100 * t["test"]["acc"] for t in trials)
    # A trial that fails (here: no batch fits) counts as the worst value, and the search still ends normally.
    failed = tmp_path / "failed"
    out = main("train", "-m", *quick, "hydra.sweeper.n_trials=1", "recipe.student.drop_last=true",
               "recipe.student.batch_size=100000", f"hydra.sweep.dir={failed}")
    assert yaml.safe_load((failed / "optimization_results.yaml").read_text())["best_value"] == float("inf")
    assert not (failed / "0" / "metrics.json").exists()


def test_a_training_call_puts_the_deterministic_setting_back_and_reuses_the_networks_it_is_given(tiny, tmp_path):
    cfg = api.compose("train", [*tiny, "student=fitnet_mnist", "schedule=backprop", "recipe.student.max_epochs=1",
                                "deterministic=true"])
    built = api.networks(cfg)
    assert not torch.are_deterministic_algorithms_enabled()
    api.train(cfg, run_dir=tmp_path / "run", built=built)
    assert not torch.are_deterministic_algorithms_enabled()   # the run set it; the call put it back
    saved = torch.load(tmp_path / "run" / "checkpoints" / "student.pt", weights_only=True)["state_dict"]
    trained = built.trained.net.state_dict()   # the very network handed in is the one trained and saved
    assert all(torch.equal(saved[k], trained[k].cpu()) for k in saved)
