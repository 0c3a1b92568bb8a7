"""The CIFAR-100 distillation benchmark of CRD: the zoo networks, its recipe, the 13-pair preset and compare's
benchmark layout, on tiny data."""

import json
import re

import pytest
import torch

from fitnets_cli.commands.benchmark import PUBLISHED
from fitnets_cli.config.commands import network_lrs
from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Network
from fitnets_cli.data.load import load_data
from fitnets_cli.networks import zoo
from fitnets_cli.networks.build import build_network, count
from fitnets_cli.training.hints import default_tap
from fitnets_cli.training.loop import make_optimizer, set_hyper

from helpers import failure, main

# Trainable parameters at 100 classes and 3x32x32, as HobbitLong/RepDistiller's models/ build them (counted
# from its code with torch; the same state_dict keys and shapes, and the same outputs for the same weights).
BENCHMARK_PARAMS = {
    "resnet20": 278_324, "resnet32": 472_756, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860, "wrn_16_2": 703_284, "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156, "vgg8": 3_965_028, "vgg13": 9_462_180, "MobileNetV2": 812_836,
    "ShuffleV1": 949_258, "ShuffleV2": 1_355_528, "ResNet50": 23_705_252,
}
HINT = {"wrn_16_2": (64, 16, 16), "resnet8x4": (128, 16, 16), "vgg8": (256, 8, 8), "MobileNetV2": (16, 8, 8),
        "ShuffleV1": (480, 8, 8), "ShuffleV2": (232, 8, 8), "ResNet50": (512, 16, 16)}   # feat[2] at 32x32


@pytest.mark.parametrize("name", BENCHMARK_PARAMS)
def test_zoo_networks_have_the_benchmarks_parameter_counts(name):
    net = getattr(zoo, name)(num_classes=100)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == BENCHMARK_PARAMS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARK_PARAMS)
def test_zoo_networks_adapt_to_mnist_and_every_parameter_learns(name, make_config):
    cfg = make_config("train", ["dataset=mnist", "student=zoo", f"student.arch={name}"])
    net = build_network(cfg.student, (1, 28, 28), 10)
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert default_tap(net) in net.shapes and first.in_channels == 1 and net.repeat == 1
    net.train()
    net(torch.rand(4, 1, 28, 28)).logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()), name


@pytest.mark.slow
def test_zoo_sizes_at_cifar_shape_through_the_seam(make_config):
    for name, shape in HINT.items():
        cfg = make_config("train", ["dataset=cifar100_crd", "student=zoo", f"student.arch={name}"])
        net = build_network(cfg.student, (3, 32, 32), 100)
        assert cfg.student.guided is None and net.shapes[default_tap(net)] == shape, name
    sizes = count(build_network(Network(source="zoo", arch="resnet8x4"), (3, 32, 32), 100))
    assert sizes["params"] == BENCHMARK_PARAMS["resnet8x4"] and sizes["mults"] == pytest.approx(177e6, rel=0.01)


@pytest.mark.slow
def test_layers_of_a_zoo_pair_marks_the_benchmarks_hint_point():
    out = main("layers", "pair=resnet32x4-ShuffleV2", "dataset=cifar100_crd", "hints.regressor=conv_bn")
    assert re.search(r"│ layer2 +│ 16x16x128 +│ <- hint", out)
    assert re.search(r"│ layer2 +│ 8x8x232 +│ <- guided", out)
    assert "default pair: hint layer2 (the network's hint point) <- guided layer2 (the network's hint point)" in out
    assert "4x4 stride-2 transposed conv + BN + ReLU" in out


def test_the_recipe_steps_the_lr_with_weight_decay_and_the_small_students_lr(make_config):
    cfg = network_lrs(make_config("train", ["experiment=crd_cifar100", "pair=vgg13-MobileNetV2"]))
    assert (cfg.recipe.student.lr, cfg.recipe.teacher.lr) == (0.01, 0.05)   # RepDistiller: 0.01 for these
    assert cfg.recipe.kd.form == "hinton" and cfg.recipe.hint_epochs == 30 and cfg.dataset.normalize
    optim = make_config("train", ["experiment=crd_cifar100"]).recipe.student
    opt = make_optimizer([torch.nn.Linear(2, 2)], [], optim)
    assert opt.defaults["weight_decay"] == 5e-4 and opt.defaults["momentum"] == 0.9
    lrs = [set_hyper(opt, optim, epoch, 0) for epoch in (0, 149, 150, 179, 180, 210, 239)]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005, 0.00005])


def test_normalize_standardizes_each_channel_over_the_training_images(make_config, tiny_datasets, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    cfg = make_config("train", ["dataset=cifar100_crd", f"data.root={tiny_datasets['cifar100']}",
                                "dataset.valid_size=10"])
    data = load_data(cfg.dataset, cfg.data, torch.device("cpu"))
    train = torch.cat([data.train.x, data.valid.x])
    std, mean = torch.std_mean(train, dim=(0, 2, 3))
    assert mean.abs().max() < 1e-5 and (std - 1).abs().max() < 1e-5
    plain = load_data(make_config("train", ["dataset=cifar100_crd", f"data.root={tiny_datasets['cifar100']}",
                                            "dataset.valid_size=10", "dataset.normalize=false"]).dataset,
                      cfg.data, torch.device("cpu"))
    assert 0 <= plain.test.x.min() and plain.test.x.max() <= 1   # pixels scaled to [0, 1] ...
    std, mean = torch.std_mean(torch.cat([plain.train.x, plain.valid.x]), dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(data.test.x, (plain.test.x - mean) / std, atol=1e-5)   # ... then the training stats


PAIRS = ["resnet56-resnet20", "resnet32x4-ShuffleV2"]


@pytest.fixture(scope="module")
def benchmark_sweep(tiny_datasets, tmp_path_factory):
    """The preset as a short multirun on tiny CIFAR-100 files, for two of its pairs: 2 teachers, 8 students."""
    import torchvision

    root = tmp_path_factory.mktemp("crd")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
        main("train", "-m", "experiment=crd_cifar100", f"pair={','.join(PAIRS)}",
             f"data.root={tiny_datasets['cifar100']}", "dataset.valid_size=10", f"teacher_store={root / 'teachers'}",
             "recipe.student.max_epochs=1", "recipe.hint_epochs=1", "recipe.student.batch_size=8", "device=cpu",
             f"hydra.sweep.dir={root / 'sweep'}")
    return root / "sweep"


@pytest.mark.slow
def test_the_preset_runs_every_schedule_of_its_pairs(benchmark_sweep):
    runs = [json.loads(p.read_text()) for p in benchmark_sweep.rglob("metrics.json")]
    teachers = sorted(m["model"] for m in runs if m["role"] == "teacher")
    assert teachers == ["resnet32x4", "resnet56"]
    students = sorted((m["teacher"], m["model"], m["schedule"]) for m in runs if m["role"] == "student")
    assert students == sorted((p.split("-")[0], p.split("-")[1], s) for p in PAIRS
                              for s in ("backprop", "kd", "crd_fitnet", "fitnets"))
    stages = {"backprop": ["ce"], "kd": ["kd"], "crd_fitnet": ["joint"], "fitnets": ["hint:layer2<-layer2", "kd"]}
    for m in runs:
        if m["role"] == "student":
            assert [(s["name"], s["epochs"]) for s in m["stages"]] == [(n, 1) for n in stages[m["schedule"]]]


@pytest.mark.slow
def test_compare_lays_the_runs_out_as_the_benchmark_with_the_published_numbers(benchmark_sweep):
    records = json.loads(main("compare", f"runs={benchmark_sweep}", "layout=benchmark", "format=json"))
    metrics = {(m["teacher"] if m["role"] == "student" else m["model"], m["model"], m["schedule"]): m
               for m in (json.loads(p.read_text()) for p in benchmark_sweep.rglob("metrics.json"))}
    for r in records:
        assert r["published"] == PUBLISHED["cifar100", r["teacher"], r["student"]].get(r["method"])
        if r["method"] in ("at", "sp", "pkt", "dkd"):   # published, not run by the sweep
            assert r["test_acc"] is None and r["published"] is not None
            continue
        key = (r["teacher"], r["teacher"], "teacher") if r["method"] == "teacher" else \
            (r["teacher"], r["student"], r["method"])
        assert r["test_acc"] == pytest.approx(100 * metrics[key]["test"]["acc"])
        assert r["test_acc_last"] == pytest.approx(100 * metrics[key]["test_last"]["acc"])
    assert len(records) == 2 * 9   # 8 published methods (4 run) and fitnets, per pair
    text = main("compare", f"runs={benchmark_sweep}", "layout=benchmark", "format=md")
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == ["method", "resnet56 -> resnet20", "resnet32x4 -> ShuffleV2"]   # the benchmark's order
    rows = {line[0]: line[1:] for line in lines[2:]}
    assert [line[0] for line in lines[2:]] == ["teacher", "published", "student (backprop)", "published", "KD",
                                               "published", "FitNet (crd_fitnet)", "published", "AT", "published",
                                               "SP", "published", "PKT", "published", "DKD", "published",
                                               "FitNets, two stages (fitnets)"]
    assert [line[1:] for line in lines[2:] if line[0] == "published"] == [
        ["72.34", "79.42"], ["69.06", "71.82"], ["70.66", "74.45"], ["69.21", "73.54"], ["70.55", "72.73"],
        ["69.67", "74.56"], ["70.34", "74.69"], ["71.97", "77.07"]]
    assert rows["AT"] == ["", ""]   # not run: named over its published figures
    assert all(re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d\)", cell) for cell in rows["KD"])


@pytest.mark.slow
def test_compare_rows_name_each_students_teacher(benchmark_sweep):
    rows = json.loads(main("compare", f"runs={benchmark_sweep}", "speed.enabled=false", "format=json"))
    for r in rows:
        if r["role"] == "student":
            teacher = next(t for t in rows if t["model"] == r["teacher"])
            assert r["compression"] == pytest.approx(teacher["params"] / r["params"])
            assert r["gap_teacher"] == pytest.approx(r["test_acc"] - teacher["test_acc"])


def test_a_checkpoint_in_the_benchmarks_format_loads_as_teacher_weights(tmp_path, make_config):
    net = zoo.resnet8x4(num_classes=100)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()   # momentum buffers: the optimiser state that RepDistiller's ckpt_epoch_240.pth files carry
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": net.state_dict(), "accuracy": torch.tensor(79.42),
                "optimizer": opt.state_dict()}, path)
    cfg = make_config("train", ["dataset=cifar100_crd", "teacher=zoo", "teacher.arch=resnet8x4", f"teacher.weights={path}"])
    teacher = build_network(cfg.teacher, (3, 32, 32), 100).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(x), net.eval()(x))


def test_channels_last_puts_the_networks_in_that_layout_with_the_same_outputs(make_config):
    from fitnets_cli.training.train import maybe_compile

    cfg = make_config("train", ["experiment=crd_cifar100", "pair=resnet56-resnet20"])
    assert cfg.channels_last
    net = build_network(cfg.student, (3, 32, 32), 100).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = net(x)
    maybe_compile(net, cfg)
    assert net.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert net.taps(x, ["layer2"])["layer2"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x), plain, rtol=1e-4, atol=1e-5)


def test_layout_benchmark_without_runs_stops_in_one_line():
    assert "layout=benchmark needs runs" in failure("compare", "layout=benchmark", "dataset=mnist",
                                                    "speed.enabled=false")


def test_normalize_is_refused_where_it_would_not_apply(make_config):
    with pytest.raises(ConfigError, match="image files take dataset.images.mean/std"):
        make_config("train", ["dataset=imagefolder", "dataset.normalize=true"])
