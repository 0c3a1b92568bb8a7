"""FitNets on any network: torchvision models and the user's own nn.Module behind the network seam, taps by
module path or FX node name, `fitnets layers`, the regressors, crd_fitnet and Hinton's KD."""

import json
import math
import re
import signal

import pytest
import torch
import torch.nn.functional as F

from fitnets_cli.config.commands import TrainConfig
from fitnets_cli.config.groups import Dataset, HintPair, Hints, KD, Network, Optim, Recipe, Schedule, StageSpec, TermSpec
from fitnets_cli.data.splits import Resident
from fitnets_cli.networks.build import build_network
from fitnets_cli.networks.checkpoint import FORMAT
from fitnets_cli.training.hints import default_tap
from fitnets_cli.training.losses import hint_loss, kd_soft
from fitnets_cli.training.stages import plan_stages, session, stage_loss, weights_at

from helpers import (call, failure, in_stage, signal_when, start, tiny_overrides, tiny_run, train_stages, without_timing,
                     write_tiny_mnist)

USER_NET = '''
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ThinNet(nn.Module):
    """A user's network, unchanged: three groups of blocks and a linear head."""

    def __init__(self, width=4, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.group1 = nn.Sequential(Block(width, width, 1), Block(width, width, 1))
        self.group2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1))
        self.group3 = nn.Sequential(Block(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.group3(self.group2(self.group1(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny MNIST, and a user's module in a folder outside the package, importable by the runs of this module."""
    root = tmp_path_factory.mktemp("any")
    (root / "userpkg").mkdir()
    (root / "userpkg" / "usernets.py").write_text(USER_NET)
    base = tiny_overrides(write_tiny_mnist(root / "data"), root / "teachers") + ["recipe.student.max_epochs=1",
                                                                                   "recipe.teacher.max_epochs=1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root / "userpkg"))        # for runs in this process
        patch.setenv("PYTHONPATH", str(root / "userpkg"))   # and in a subprocess
        yield root, base


TV_TEACHER = ["teacher=torchvision", "teacher.arch=resnet18"]
TV_STUDENT = ["student=torchvision", "student.arch=resnet18", "+student.width_per_group=64"]
USER_STUDENT = ["student=module", "student._target_=usernets.ThinNet", "+student.width=4"]


def test_layers_lists_taps_of_a_torchvision_model_and_a_user_module(world):
    root, base = world
    out = call("layers", "dataset=mnist", *TV_TEACHER, *USER_STUDENT).stdout
    # resnet18 on 1x28x28 (fed as 3 grey copies): the residual sum and the twice-called ReLU are taps
    for line in ("layer1.0.add ", "layer1.0.relu_0 ", "layer1.0.relu_1 ", "layer2 ", "fc "):
        assert line in out, line
    assert re.search(r"│ layer2 +│ 4x4x128 +│ <- hint", out) and re.search(r"│ group2 +│ 14x14x8 +│ <- guided", out)
    assert "default pair: hint layer2 (the second group of blocks) <- guided group2 (the second group of blocks)" in out
    assert "11x11 conv, relu" in out   # 14 - 4 + 1: the paper's regressor, with the hint's ReLU


@pytest.mark.slow
def test_two_stage_runs_for_every_source_and_their_checkpoints_reload(world):
    root, base = world
    call("train-teacher", *base, *TV_TEACHER, f"hydra.run.dir={root / 'tv_teacher'}")
    assert (root / "teachers" / "resnet18-mnist.pt").is_file()
    jobs = {"tv_tv": TV_TEACHER + TV_STUDENT + ["hints.regressor=conv_bn"],
            "maxout_tv": TV_STUDENT + ["teacher.auto_train=true"],
            "user_tv": TV_TEACHER + USER_STUDENT}
    stage1 = {"tv_tv": "hint:layer2<-layer2", "maxout_tv": "hint:layer2<-conv2", "user_tv": "hint:group2<-layer2"}
    for name, args in jobs.items():
        call("train", *base, *args, f"hydra.run.dir={root / name}")
        metrics = json.loads((root / name / "metrics.json").read_text())
        assert [s["name"] for s in metrics["stages"]] == [stage1[name], "kd"]
        checkpoint = root / name / "checkpoints" / "student.pt"
        out = call("eval", f"checkpoint={checkpoint}", f"data.root={root / 'data'}").stdout
        assert f"{metrics['test']['acc']:.2%}" in out, out
    rows = json.loads(call("compare", f"runs=[{root / 'tv_tv'},{root / 'user_tv'},{root / 'tv_teacher'}]",
                          "speed.repeats=1", "speed.warmup=0", "format=json").stdout)
    assert {(r["model"], r["role"]) for r in rows} == {("resnet18", "teacher"), ("resnet18", "student"),
                                                       ("usernets.ThinNet", "student")}
    # ThinNet(width=4) by hand: stem 40, group1 2 x 152, group2 304 + 592, group3 1,184, head 170
    assert next(r for r in rows if r["model"] == "usernets.ThinNet")["params"] == 2594
    # a teacher from any source: the stored resnet18's plain state_dict, given as teacher.weights
    plain = root / "plain.pt"
    weights = torch.load(root / "teachers" / "resnet18-mnist.pt", weights_only=True)["state_dict"]
    torch.save({k.removeprefix("model."): v for k, v in weights.items()}, plain)
    call("train", *base, *TV_TEACHER, *USER_STUDENT, "schedule=kd", f"teacher.weights={plain}",
        "teacher_store=nowhere", f"hydra.run.dir={root / 'from_weights'}")
    assert json.loads((root / "from_weights" / "metrics.json").read_text())["teacher"] == "resnet18"


@pytest.mark.slow
def test_a_checkpoint_of_the_previous_format_still_loads(world):
    root, base = world
    call("train-teacher", *base, f"hydra.run.dir={root / 'maxout_teacher'}", f"teacher_store={root / 'old_store'}")
    new = torch.load(root / "maxout_teacher" / "checkpoints" / "teacher.pt", weights_only=True)
    assert new["format"] == FORMAT
    old = {k: v for k, v in new.items() if k != "network"} | {"format": "fitnets-checkpoint-1",
                                                              "layers": new["network"]["layers"]}
    torch.save(old, root / "old.pt")
    acc = json.loads((root / "maxout_teacher" / "metrics.json").read_text())["test"]["acc"]
    assert f"{acc:.2%}" in call("eval", f"checkpoint={root / 'old.pt'}", f"data.root={root / 'data'}").stdout
    call("train", *base, "student=fitnet_mnist", "schedule=kd", f"teacher.checkpoint={root / 'old.pt'}",
        f"hydra.run.dir={root / 'from_old'}")


@pytest.mark.parametrize("args, message", [
    (["hints.pairs=[{hint: layer2.0.relu, guided: group2}]"],
     "hint layer 'layer2.0.relu' runs 2 times in one forward pass; name one call: layer2.0.relu_0, layer2.0.relu_1"),
    (["hints.pairs=[{hint: layr2, guided: group2}]"], "hint layer 'layr2' does not exist; closest: layer2, "),
    (["hints.pairs=[{hint: conv1, guided: group3}]"],
     "hint conv1 14x14x64 <- guided group3 7x7x16: the teacher's map is larger than the student's"),
    (["hints.pairs=[{hint: layer2, guided: group2}]", "hints.regressor=1x1"],
     "hint layer2 4x4x128 <- guided group2 14x14x8: hints.regressor=1x1 needs maps of the same size"),
])
def test_bad_pairs_stop_before_training_with_one_line(world, tmp_path, args, message):
    root, base = world
    out = tmp_path / "run"
    # No teacher exists in this store: the pair is checked first, from the configs, and nothing is written.
    assert message in failure("train", *base, *TV_TEACHER, *USER_STUDENT, *args, f"teacher_store={tmp_path / 'none'}",
                              f"hydra.run.dir={out}")
    assert not out.exists()


def tiny_resnet_session(tmp_path, teacher_arch="resnet18"):
    torch.manual_seed(0)
    hints = Hints(pairs=[HintPair()], regressor="conv_bn", reduction="mse")
    teacher = build_network(Network(name="t", arch=teacher_arch), (3, 16, 16), 10).eval().requires_grad_(False)
    student = build_network(Network(name="s", arch="resnet18"), (3, 16, 16), 10)
    # A hint stage and the CRD benchmark's joint stage (schedule=crd_fitnet).
    schedule = Schedule(name="crd_fitnet", hint_weight=100.0, stages=[
        StageSpec(name="hint", train="guided", per_pair=True, terms=[TermSpec(term="hint")]),
        StageSpec(name="joint", terms=[TermSpec(term="ce"), TermSpec(term="hint")])])
    cfg = TrainConfig(command="train", hints=hints, schedule=schedule,
                      recipe=Recipe(student=Optim(lr=0.1, optimizer="sgd"), teacher=Optim(lr=0.1), kd=KD()),
                      dataset=Dataset(name="x", family="x", num_classes=10, in_shape=[3, 16, 16], valid_size=0),
                      teacher_cache=False)
    stages = plan_stages(cfg, teacher, student)
    return tiny_run(cfg, tmp_path), session(student, teacher, stages, torch.device("cpu")), stages


def test_stage_one_changes_only_what_the_guided_tap_depends_on(tmp_path):
    run, s, stages = tiny_resnet_session(tmp_path)
    assert [p.guided for p in stages[0].plans] == ["layer2"] and default_tap(s.net) == "layer2"
    before = {k: v.clone() for k, v in s.net.state_dict().items()}
    teacher = {k: v.clone() for k, v in s.teacher.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = Resident(torch.rand(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
    train_stages(run, s, stages[:1], data, None, [1])
    changed = {k for k, v in s.net.state_dict().items() if not torch.equal(v, before[k])}
    upto = ("model.conv1.", "model.bn1.", "model.layer1.", "model.layer2.")
    # every weight and running statistic up to layer2 moved (num_batches_tracked too); nothing after it
    assert changed == {k for k in before if k.startswith(upto)}
    assert all(torch.equal(v, teacher[k]) for k, v in s.teacher.state_dict().items())


def test_crd_fitnet_loss_is_ce_plus_100_mse_through_conv_bn(tmp_path, make_config):
    cfg = make_config("train", ["schedule=crd_fitnet"])
    terms = [[(t.term, t.weight) for t in stage.terms] for stage in cfg.schedule.stages]
    assert (terms, cfg.schedule.hint_weight, cfg.hints.regressor, cfg.hints.reduction) == \
        ([[("ce", None), ("hint", None)]], 100.0, "conv_bn", "mse")
    run, s, stages = tiny_resnet_session(tmp_path, teacher_arch="resnet34")
    stage = stages[1]
    assert [t.weight[0] for t in stage.terms] == [1.0, 100.0]
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    target = s.teacher.taps(x, ["layer2"])["layer2"]
    loss, terms, logits = stage_loss(s, stage, x, y, weights_at(stage, 0), {"layer2": target})
    regressor = s.regressors["layer2"]
    assert [type(m).__name__ for m in regressor] == ["Conv2d", "BatchNorm2d", "ReLU"]
    guided = s.net.taps(x, ["layer2"])["layer2"]
    by_hand = F.cross_entropy(s.net(x), y) + 100 * ((regressor(guided) - target) ** 2).sum() / target.numel()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_hinton_kd_matches_a_hand_computation():
    s, t, y, tau = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([1]), 4.0
    softmax = lambda v: [math.exp(a) / sum(math.exp(b) for b in v) for a in v]
    pt, ps = softmax([a / tau for a in (3.0, 0.0, 0.0)]), softmax([a / tau for a in (1.0, 2.0, 0.0)])
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    ce = -math.log(softmax([1.0, 2.0, 0.0])[1])
    soft = kd_soft(s, t, tau, form="hinton")
    assert soft.item() == pytest.approx(kl * tau**2, rel=1e-6)
    assert torch.nn.functional.cross_entropy(s, y).item() == pytest.approx(ce, rel=1e-6)
    assert hint_loss(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), "mse").item() == 1.0


@pytest.mark.parametrize("student_hw, teacher_hw, kind", [
    (8, 4, "3x3 stride-2 conv"), (4, 8, "4x4 stride-2 transposed conv"), (8, 8, "1x1 conv"), (8, 6, "3x3 conv")])
def test_conv_bn_regressor_maps_the_guided_shape_onto_the_hint_shape(student_hw, teacher_hw, kind):
    from fitnets_cli.training.hints import plan

    class Fake:
        shapes = {"h": (32, teacher_hw, teacher_hw)}
    p = plan("h", "g", Fake, (16, student_hw, student_hw), Hints(pairs=[], regressor="conv_bn"))
    assert p.regressor.startswith(kind)
    assert p.make()(torch.randn(2, 16, student_hw, student_hw)).shape == (2, 32, teacher_hw, teacher_hw)


def test_unknown_sources_and_arguments_stop_with_one_line(world, tmp_path):
    root, base = world
    for args, message in [
        (["teacher=torchvision", "teacher.arch=resnet1"], "arch='resnet1' is not a torchvision.models classifier; "
                                                           "closest: resnet18"),
        (["student=module", "student._target_=nowhere.Net"], "_target_=nowhere.Net: cannot import it"),
        (["+teacher.depth=28"], "keyword arguments ['depth'] apply to arch or _target_ networks"),
        (["teacher._target_=usernets.ThinNet"], "sets layers and _target_"),
    ]:
        assert message in failure("train", *base, *args, f"hydra.run.dir={tmp_path / 'x'}")


@pytest.mark.slow
def test_a_user_module_run_resumes_exactly_after_a_kill(world, tmp_path):
    root, base = world
    args = [*base, *USER_STUDENT, "schedule=backprop", "recipe.student.max_epochs=6", "recipe.student.batch_size=8",
            "deterministic=true"]
    call("train", *args, f"hydra.run.dir={tmp_path / 'reference'}")
    proc = start("train", *args, f"hydra.run.dir={tmp_path / 'run'}")
    signal_when(proc, tmp_path / "run" / "checkpoints" / "last.pt", lambda st: in_stage(st) and in_stage(st)["epoch"] >= 2, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode == -9 and not (tmp_path / "run" / "metrics.json").exists()
    call("train", f"resume={tmp_path / 'run'}")
    done = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("reference", "run")]
    for m in done:
        m["stages"][0]["history"] = without_timing(m["stages"][0]["history"])
    assert done[0]["stages"] == done[1]["stages"] and done[0]["test"] == done[1]["test"]
