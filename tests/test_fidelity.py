"""The settings that follow the authors' code (adri-romsor/FitNets, pylearn2) replay it exactly, and every
setting the schema accepts is used."""

import ast
import dataclasses
import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
import torchvision

import fitnets_cli
from fitnets_cli import config
from fitnets_cli.data import load_data
from fitnets_cli.loop import set_hyper

from helpers import call, failure


def optimizer_for(optim):
    return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr_scale": 1.0}], lr=optim.lr)


def test_mnist_teacher_lr_and_momentum_replay_pylearn2(make_config):
    # pylearn2's maxout mnist.yaml: ExponentialDecay(1.00004, min_lr 1e-6) after every update, and
    # MomentumAdjustor(start 1, saturate 250, final 0.7) counting epoch + 1.
    optim = make_config("train_teacher", ["dataset=mnist"]).recipe.teacher
    opt = optimizer_for(optim)
    per_epoch = 391
    for epoch, b in [(0, 0), (0, 1), (3, 17), (249, 0), (300, 5), (499, 390)]:
        update = epoch * per_epoch + b
        assert set_hyper(opt, optim, epoch, update) == pytest.approx(max(0.05 / 1.00004 ** update, 1e-6), rel=1e-9)
        alpha = min(max((epoch + 1 - 1) / (250 - 1), 0.0), 1.0)
        assert opt.param_groups[0]["momentum"] == pytest.approx(0.5 * (1 - alpha) + 0.7 * alpha)
    assert set_hyper(opt, optim, 10_000, 10**7) == 1e-6   # never below min_lr


def test_mnist_student_max_norms_follow_the_authors_yaml(make_config):
    # yaml/MNIST_fitnet_valid.yaml: max_kernel_norm .9 on h0, h1 and 1.9365 on h2-h5, max_col_norm 1.9365.
    layers = make_config("train", ["dataset=mnist", "student=fitnet_mnist"]).student.layers
    assert [l.max_norm for l in layers] == [0.9, 0.9, 1.9365, 1.9365, 1.9365, 1.9365, 1.9365]


def test_the_default_hint_loss_is_the_authors_reduction(make_config):
    assert make_config("train").hints.reduction == "code"


def test_valid_split_last_holds_out_the_last_training_images(make_config, tiny_mnist):
    overrides = ["dataset=mnist", f"data.root={tiny_mnist}", "dataset.valid_size=50", "data.valid_split=last"]
    cfg = make_config("train", overrides)
    data = load_data(cfg.dataset, cfg.data, torch.device("cpu"))
    raw = torchvision.datasets.MNIST(tiny_mnist, train=True)
    assert torch.equal(data.valid.y, raw.targets[-50:])
    assert torch.equal(data.valid.x, raw.data[-50:].unsqueeze(1).float() / 255)
    assert torch.equal(data.train.y, raw.targets[:-50])


def test_student_dropout_is_applied(tiny, tmp_path):
    runs = {}
    for p in (0.0, 0.5):
        call("train", *tiny, "student=fitnet_mnist", "schedule=backprop", "recipe.student.max_epochs=1",
             f"recipe.student.dropout={p}", f"hydra.run.dir={tmp_path / str(p)}")
        runs[p] = json.loads((tmp_path / str(p) / "metrics.json").read_text())
    first = lambda p: runs[p]["stages"][0]["history"][0]
    assert first(0.0)["train_ce"] != first(0.5)["train_ce"]


def test_settings_that_would_have_no_effect_are_rejected(tiny, tmp_path):
    for override, words in [("recipe.student.momentum=0.9", "optimizer=sgd only"),
                            ("recipe.student.lr_decay_factor=0.1", "lr_decay_saturate > 0"),
                            ("recipe.student.batch_size=1000", "leaves no batch")]:
        extra = ["recipe.student.drop_last=true"] if "batch_size" in override else []
        assert words in failure("train", *tiny, "schedule=backprop", override, *extra, f"hydra.run.dir={tmp_path / 'r'}")


def test_every_schema_field_is_read_by_the_code_or_a_config_interpolation():
    src = Path(fitnets_cli.__file__).parent
    read = set()
    for path in src.glob("*.py"):
        if path.name != "config.py":
            read |= {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
    for path in Path(str(resources.files("fitnets_cli.conf"))).rglob("*.yaml"):
        for ref in re.findall(r"\$\{([^}]*)\}", path.read_text()):
            read |= set(re.split(r"[.${}]+", ref))
    schemas = [c for c in vars(config).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    unread = [f"{c.__name__}.{f.name}" for c in schemas for f in dataclasses.fields(c) if f.name not in read]
    assert not unread, f"accepted but never read: {unread}"
