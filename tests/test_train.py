from collections import Counter

import pytest
import torch

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import HintPair
from fitnets_cli.networks.maxout import Net, build_net
from fitnets_cli.networks.taps import Tapped
from fitnets_cli.training.hints import plan_hints, regressor_params
from fitnets_cli.training.stages import evaluate_stage, plan_stages
from helpers import main, mnist_session, random_split, train_stages


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_stage_one_trains_only_the_guided_part_and_the_regressor(make_config, tmp_path):
    run, s, stages = mnist_session(make_config, tmp_path)
    student, teacher, regressor = snapshot(s.net), snapshot(s.teacher), snapshot(s.regressors)
    train_stages(run, s, stages[:1], random_split(64, 0), None, [2])
    moved = changed(student, s.net)
    assert {k.split(".")[1] for k in moved} == {"conv1", "conv2", "conv3", "conv4"}
    assert not changed(teacher, s.teacher)
    assert changed(regressor, s.regressors) == set(regressor)


def test_hand_off_keeps_the_best_stage_one_weights_and_stage_two_trains_the_whole_student(make_config, tmp_path):
    # A large LR makes validation loss bounce, so the best epoch is not the last one.
    run, s, stages = mnist_session(make_config, tmp_path, ["recipe.student.lr=0.01", "recipe.student.patience=50"])
    valid = random_split(64, 1)
    [hint] = train_stages(run, s, stages[:1], random_split(64, 0), valid, [4])
    losses = [r["valid_hint"] for r in hint["history"]]
    assert hint["best_epoch"] == losses.index(min(losses)) != len(losses) - 1
    assert evaluate_stage(run.cfg, s, stages[0], valid)["hint"] == pytest.approx(min(losses), rel=1e-5)
    student, regressor = snapshot(s.net), snapshot(s.regressors)
    train_stages(run, s, stages[1:], random_split(64, 0), None, [1])
    assert {k.split(".")[1] for k in changed(student, s.net)} == set(s.net.layers)
    assert not changed(regressor, s.regressors)


def test_retraining_without_validation_runs_the_given_epochs(make_config, tmp_path):
    run, s, stages = mnist_session(make_config, tmp_path)
    results = train_stages(run, s, stages, random_split(32, 0), None, [2, 3])
    assert [r["epochs"] for r in results] == [2, 3]
    assert [r["lam"] for r in results[1]["history"]] == [4.0, pytest.approx(4 - 3 / 149), pytest.approx(4 - 6 / 149)]


def test_several_hint_pairs_become_successive_stages_shallowest_first(make_config):
    cfg = make_config("train", ["dataset=cifar10", "student=fitnet4"])
    teacher = build_net(cfg.teacher.layers, (3, 32, 32), 10)
    student = build_net(cfg.student.layers, (3, 32, 32), 10)
    plans = plan_hints(teacher, student, [HintPair("conv2", "conv11"), HintPair("conv1", "conv5")], cfg.hints)
    assert [(p.guided, p.regressor) for p in plans] == [("conv5", "1x1 conv, maxout x2"), ("conv11", "2x2 conv, maxout x2")]
    cfg = make_config("train", ["dataset=cifar10", "student=fitnet4",
                                "hints.pairs=[{hint: conv2, guided: conv11}, {hint: conv1, guided: conv5}]"])
    stages = plan_stages(cfg, teacher, student)
    assert [s.name for s in stages] == ["hint:conv5<-conv1", "hint:conv11<-conv2", "kd"]
    assert [[p.guided for p in s.plans] for s in stages] == [["conv5"], ["conv11"], []]
    # The paper's FitNet 4 regressor: 2x2 maxout conv, 80 -> 192 x 2 pieces (~123K weights).
    assert regressor_params(plans[1]) == 2 * 2 * 80 * 192 * 2 + 192 * 2


def test_impossible_hint_shapes_and_unknown_layers_stop_with_a_clear_error(make_config):
    cfg = make_config("train", ["dataset=svhn", "student=fitnet4"])
    teacher = build_net(cfg.teacher.layers, (3, 32, 32), 10)
    student = build_net(cfg.student.layers, (3, 32, 32), 10)
    with pytest.raises(ConfigError, match="larger than the student's"):
        plan_hints(teacher, student, [HintPair("conv2", "conv11")], cfg.hints)
    with pytest.raises(ConfigError, match="hint layer .conv9. does not exist; closest: conv1, conv2, conv3"):
        plan_hints(teacher, student, [HintPair("conv9", "conv11")], cfg.hints)
    with pytest.raises(ConfigError, match="guided layer 'conv99'"):
        plan_hints(teacher, student, [HintPair("conv3", "conv99")], cfg.hints)
    with pytest.raises(ConfigError, match="conv taps on both sides"):
        plan_hints(teacher, student, [HintPair("fc", "conv11")], cfg.hints)
    with pytest.raises(ConfigError, match="guides a student layer twice"):
        plan_hints(teacher, student, [HintPair("conv3", "conv11"), HintPair("conv2", "conv11")], cfg.hints)
    with pytest.raises(ConfigError, match="hints.pairs is empty"):
        plan_hints(teacher, student, [], cfg.hints)


def test_identical_shapes_need_no_regressor(make_config, tmp_path):
    cfg = make_config("train", ["dataset=cifar10", "student=fitnet4"])
    teacher = build_net(cfg.teacher.layers, (3, 32, 32), 10)
    student = build_net(cfg.student.layers, (3, 32, 32), 10)
    # FitNet 4's conv5 gives 16x16x48 maps; a hypothetical teacher layer of that shape needs no regressor.
    from fitnets_cli.config.groups import Layer
    twin = build_net([Layer(name="conv1", kind="conv", out=48, pieces=2, kernel=3, pad=1, pool=2),
                      Layer(name="softmax", kind="softmax")], (3, 32, 32), 10)
    [plan] = plan_hints(twin, student, [HintPair("conv1", "conv5")], cfg.hints)
    assert regressor_params(plan) == 0 and plan.make is None
    pair = plan_hints(teacher, student, [HintPair("conv2", "conv11")], cfg.hints)[0]
    assert regressor_params(pair) == 2 * 2 * 80 * 192 * 2 + 192 * 2


def test_joint_stage_trains_the_whole_student_and_the_regressor_together(make_config, tmp_path):
    run, s, stages = mnist_session(make_config, tmp_path, ["schedule=hint_joint"])
    student, teacher, regressor = snapshot(s.net), snapshot(s.teacher), snapshot(s.regressors)
    [result] = train_stages(run, s, stages, random_split(64, 0), None, [1])
    assert {k.split(".")[1] for k in changed(student, s.net)} == set(s.net.layers)
    assert changed(regressor, s.regressors) == set(regressor) and not changed(teacher, s.teacher)
    assert {"train_ce", "train_hint", "train_acc"} <= set(result["history"][0])


def builds(monkeypatch) -> Counter:
    """Count each network built from here on, by the name of its class (maxout nets: of their first layer's
    spec's list of names), through the two constructors every network of the seam goes through."""
    seen = Counter()
    for cls, label in ((Net, lambda args: "maxout:" + ",".join(s.name for s in args[0])),
                       (Tapped, lambda args: type(args[0]).__name__)):
        def counted(self, *args, _init=cls.__init__, _label=label, **kwargs):
            seen[_label(args)] += 1
            _init(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__init__", counted)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("student", ["fitnet_mnist", "resnet8x4"])
def test_one_train_builds_each_network_once(teacher, tmp_path, monkeypatch, student):
    # The command line's check, the hint plan, the stages, the retrained phase and the final counts all use the
    # networks built once; the trained student is saved from that very network.
    _, base = teacher
    seen = builds(monkeypatch)
    main("train", *base, f"student={student}", "recipe.student.max_epochs=1", "recipe.retrain_full=true",
         f"hydra.run.dir={tmp_path / 'run'}")
    assert sorted(seen.values()) == [1, 1] and len(seen) == 2, seen
