"""timm models behind the seam: built by name for the dataset, their stages and default hint points, token
sequences read as maps of their patch tokens, hints between CNNs and transformers through both stages, and
pretrained weights from a file or from the Hugging Face cache that the test fills (nothing is downloaded)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Network
from fitnets_cli.networks.build import build_network
from fitnets_cli.training.hints import default_tap
from fitnets_cli.training.stages import plan_stages, session
from helpers import failure, main, random_split, tiny_overrides, tiny_run, train_stages, write_tiny_mnist

SHAPE = (1, 28, 28)
VIT = {"patch_size": 4}   # a 7x7 grid of patch tokens on 28x28 images


def timm_net(arch, shape=SHAPE, classes=10, **kwargs):
    return build_network(Network(source="timm", arch=arch, kwargs=kwargs), shape, classes)


# The default hint or guided tap of each family: the middle stage of its feature_info, a stage output (never
# a head, a dropout or a norm inside a layer).
@pytest.mark.slow
@pytest.mark.parametrize("arch, kwargs, stages, default", [
    ("test_resnet", {}, ["act1", "layer1", "layer2", "layer3", "layer4"], "layer2"),
    ("test_convnext", {}, ["stages.0", "stages.1", "stages.2", "stages.3"], "stages.2"),
    ("test_efficientnet", {}, ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"], "blocks.2"),
    ("test_vit", VIT, [f"blocks.{i}" for i in range(6)], "blocks.3"),
    ("swin_tiny_patch4_window7_224", {"window_size": 4, "embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
     ["layers.0", "layers.1", "layers.2", "layers.3"], "layers.2"),   # channels-last stages, read as maps
])
def test_each_family_defaults_to_the_middle_stage_of_its_feature_info(arch, kwargs, stages, default):
    net = timm_net(arch, (3, 32, 32), **kwargs)
    assert net.stages == stages and default_tap(net) == default and len(net.shapes[default]) == 3
    assert not any(".drop" in t or t.endswith((".bn1", ".norm")) for t in net.stages)
    if arch.startswith("swin"):   # (N, H, W, C) in the model, (C, H, W) behind the seam
        assert net.shapes["layers.0"] == (32, 8, 8) and not net.tokens
    x = torch.rand(2, 3, 32, 32)
    assert net.taps(x, [default])[default].shape == (2, *net.shapes[default])


@pytest.mark.parametrize("arch, kwargs, prefix", [
    ("test_vit", VIT, 1),                                       # a class token
    ("test_vit", {**VIT, "reg_tokens": 4}, 5),                  # and four register tokens
    ("deit_tiny_distilled_patch16_224", {**VIT, "depth": 2}, 2),   # class and distillation tokens
])
def test_token_sequences_are_read_as_the_map_of_their_patch_tokens(arch, kwargs, prefix):
    net = timm_net(arch, **kwargs)
    width = net.model.embed_dim
    assert net.tokens["blocks.1"] == (prefix, (7, 7)) and net.shapes["blocks.1"] == (width, 7, 7)
    x = torch.rand(2, *SHAPE)
    seen = {}
    net.model.blocks[1].register_forward_hook(lambda m, i, out: seen.setdefault("out", out))
    net.eval()(x)
    tokens = seen["out"]
    assert tokens.shape == (2, prefix + 49, width)
    mapped = net.taps(x, ["blocks.1"])["blocks.1"]
    assert torch.equal(mapped[:, :, 2, 3], tokens[:, prefix + 2 * 7 + 3])   # patch (row 2, column 3)


def test_the_patch_embedding_and_position_embedding_train_in_stage_one():
    student = timm_net("test_vit", **VIT)
    trained = {id(p) for m in student.depends("blocks.1") for p in m.parameters()}
    model = student.model
    assert {id(model.cls_token), id(model.pos_embed), id(model.patch_embed.proj.weight)} <= trained
    assert all(id(p) in trained for p in model.blocks[1].parameters())
    assert not any(id(p) in trained for p in model.blocks[2].parameters()) and id(model.head.weight) not in trained


@pytest.mark.slow
@pytest.mark.parametrize("teacher_arch, teacher_kwargs, student_arch, student_kwargs, regressor", [
    ("test_vit", VIT, "test_resnet", {}, "1x1 conv"),                                # a CNN guided by tokens
    ("test_resnet", {}, "test_vit", VIT, "bilinear resize to 4x4, 1x1 conv, relu"),   # a ViT guided by a map
])
def test_hints_join_cnns_and_transformers_through_both_stages(make_config, tmp_path, teacher_arch, teacher_kwargs,
                                                               student_arch, student_kwargs, regressor):
    torch.manual_seed(0)
    cfg = make_config("train", ["dataset=mnist", "hints.regressor=auto", "recipe.student.lr=0.001",
                                "hints.pairs=[{hint: null, guided: null}]"])   # each network's default tap
    teacher = timm_net(teacher_arch, **teacher_kwargs).eval().requires_grad_(False)
    student = timm_net(student_arch, **student_kwargs)
    stages = plan_stages(cfg, teacher, student)   # schedule=fitnets: a hint stage, then KD
    [plan] = stages[0].plans
    assert plan.regressor.endswith(regressor) or regressor in plan.regressor, plan.regressor
    s = session(student, teacher, stages, torch.device("cpu"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    run = tiny_run(cfg, tmp_path)
    [hint] = train_stages(run, s, stages[:1], random_split(16, 0), None, [1])
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    depends = {id(t) for m in student.depends(plan.guided) for t in [*m.parameters(), *m.buffers()]}
    assert moved and all(id(student.state_dict(keep_vars=True)[k]) in depends for k in moved)
    assert torch.isfinite(torch.tensor(hint["history"][0]["train_hint"]))
    [kd] = train_stages(run, s, stages[1:], random_split(16, 0), None, [1])
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())
    assert {"train_ce", "train_kd"} <= set(kd["history"][0])


@pytest.mark.slow
def test_a_vit_teacher_and_a_cnn_student_run_both_stages_from_the_command_line(tmp_path):
    base = tiny_overrides(write_tiny_mnist(tmp_path / "data"), tmp_path / "teachers")
    vit = ["teacher=timm", "teacher.arch=test_vit", "+teacher.patch_size=4", "recipe.teacher.lr=0.001"]
    main("train-teacher", *base, *vit, f"hydra.run.dir={tmp_path / 'teacher'}")
    run = tmp_path / "student"
    out = main("train", *base, *vit, "student=timm", "student.arch=test_resnet", "hints.regressor=auto",
               "recipe.student.max_epochs=1", "recipe.student.lr=0.001", f"hydra.run.dir={run}")
    assert "│ layer2           │ 4x4x48 │ blocks.3       │ 7x7x64 │ bilinear resize to 7x7, 1x1 conv │ 3,136" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert [s["name"] for s in metrics["stages"]] == ["hint:layer2<-blocks.3", "kd"]
    evaluated = main("eval", f"checkpoint={run / 'checkpoints' / 'student.pt'}", "device=cpu",
                     f"data.root={tmp_path / 'data'}")
    assert f"{metrics['test']['acc']:.2%}" in evaluated


def test_a_weights_file_of_another_class_count_loads_without_its_head(tmp_path):
    torch.manual_seed(1)
    imagenet = timm_net("test_resnet", (3, 32, 32), 1000).model.state_dict()
    torch.save(imagenet, tmp_path / "imagenet.pth")
    net = build_network(Network(source="timm", arch="test_resnet", weights=str(tmp_path / "imagenet.pth")),
                        (3, 32, 32), 10)
    mine = net.model.state_dict()
    assert mine["fc.weight"].shape == (10, imagenet["fc.weight"].shape[1])
    assert all(torch.equal(mine[k], v) for k, v in imagenet.items() if not k.startswith("fc."))


def hub_cache(root, arch) -> tuple[dict, str]:
    """Fill a Hugging Face cache under root with a checkpoint of `arch` where timm looks for its default weights;
    return the weights and the repository id."""
    import timm

    repo = timm.get_pretrained_cfg(arch).hf_hub_id
    snapshot = root / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(2)
    weights = timm.create_model(arch).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, snapshot / "model.safetensors")
    return weights, repo


PROBE = ("import sys, torch; from fitnets_cli.config.groups import Network; from fitnets_cli.networks.build import build_network; "
         "net = build_network(Network(source='timm', arch='test_resnet', pretrained=True), (3, 32, 32), 10); "
         "torch.save(net.model.state_dict(), sys.argv[1])")


@pytest.mark.slow
def test_pretrained_weights_come_from_the_hugging_face_cache_offline(tmp_path):
    weights, repo = hub_cache(tmp_path / "hf", "test_resnet")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", PROBE, tmp_path / "got.pt"], env=env, check=True, timeout=300)
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in weights.items() if not k.startswith("fc."))
    # The same, with the cache empty: one line naming what was looked for, and how to provide it.
    env["HF_HOME"] = str(tmp_path / "empty")
    proc = subprocess.run([sys.executable, "-m", "fitnets_cli", "layers", "dataset=cifar10", "teacher=timm",
                           "teacher.arch=test_resnet", "teacher.pretrained=true", "student=fitnet4"],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"pretrained=true looked for {repo}" in lines[0] and str(tmp_path / "empty") in lines[0]
    assert "pass weights=PATH" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["teacher.arch=vit_tiny_patch16_224", "+teacher.dynamic_img_size=false", "+teacher.img_size=224"],
     "network vit_tiny_patch16_224 does not run on (3, 32, 32) images"),
    (["teacher.arch=resnet1O"], "arch='resnet1O' is not a timm model; closest: resnet18"),
    (["teacher.arch=test_resnet", "+teacher.no_such_option=1"], "network test_resnet: "),
])
def test_bad_timm_input_stops_in_one_line_with_the_fix(tmp_path, args, says):
    line = failure("train", "dataset=cifar10", "teacher=timm", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert says in line, line
    assert not (tmp_path / "run").exists()


def test_a_missing_weights_file_and_pretrained_on_another_source_stop_in_one_line(tmp_path):
    assert "weights file /nonexistent.pth for test_resnet does not exist" in failure(
        "layers", "teacher=timm", "teacher.arch=test_resnet", "teacher.weights=/nonexistent.pth",
        f"hydra.run.dir={tmp_path / 'run'}")
    assert "pretrained=true takes a timm or torchvision model's default weights" in failure(
        "layers", "teacher=zoo", "teacher.pretrained=true",
        f"hydra.run.dir={tmp_path / 'run'}")


def torch_hub_cache(root, arch) -> dict:
    """Write a checkpoint of the torchvision model `arch` where torch.hub looks for its IMAGENET1K_V1 weights;
    return its weights."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    torch.manual_seed(3)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    (root / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, root / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1])
    return state


@pytest.mark.slow
def test_torchvision_weight_names_come_from_the_torch_hub_cache_with_a_head_for_the_data(tmp_path, monkeypatch):
    state = torch_hub_cache(tmp_path / "torch", "mobilenet_v3_small")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for spec in (Network(arch="mobilenet_v3_small", weights="IMAGENET1K_V1"),
                 Network(arch="mobilenet_v3_small", pretrained=True)):   # DEFAULT is IMAGENET1K_V1 here
        mine = build_network(spec, (1, 28, 28), 10).model.state_dict()
        assert mine["classifier.3.weight"].shape == (10, 1024)
        assert all(torch.equal(mine[k], v) for k, v in state.items() if not k.startswith("classifier.3."))
    # An empty cache and no network: one line naming the file looked for, and how to provide it.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ConfigError, match=r"weights IMAGENET1K_V1 looked for .*empty/hub/checkpoints/"
                                          r"mobilenet_v3_small-\w+\.pth in the torch hub cache .*offline"):
        build_network(Network(arch="mobilenet_v3_small", weights="IMAGENET1K_V1"), (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="no weights IMAGENET1K_V9 for it; its weights: DEFAULT, IMAGENET1K_V1"):
        build_network(Network(arch="mobilenet_v3_small", weights="IMAGENET1K_V9"), (1, 28, 28), 10)


@pytest.mark.slow
def test_train_teacher_fine_tunes_torchvision_imagenet_weights_and_eval_rebuilds_it(tmp_path, monkeypatch):
    state = torch_hub_cache(tmp_path / "torch", "mobilenet_v3_small")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    base = tiny_overrides(write_tiny_mnist(tmp_path / "data"), tmp_path / "teachers")
    run = tmp_path / "teacher"
    main("train-teacher", *base, "teacher=torchvision", "teacher.arch=mobilenet_v3_small",
         "teacher.weights=IMAGENET1K_V1", "recipe.teacher.max_epochs=1", f"hydra.run.dir={run}")
    tuned = torch.load(tmp_path / "teachers" / "mobilenet_v3_small-mnist.pt", weights_only=False)["state_dict"]
    # Started from the cached weights: fine-tuning moved them only a little.
    first = "model.features.0.0.weight"
    assert (tuned[first] - state["features.0.0.weight"]).abs().max() < 0.1 * state["features.0.0.weight"].abs().max()
    metrics = json.loads((run / "metrics.json").read_text())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))   # eval rebuilds the network, needs no weights
    out = main("eval", f"checkpoint={tmp_path / 'teachers' / 'mobilenet_v3_small-mnist.pt'}", "device=cpu",
               f"data.root={tmp_path / 'data'}")
    assert f"{metrics['test']['acc']:.2%}" in out


class Gated(torch.nn.Module):
    """A user's network that torch.fx cannot trace (its forward branches on the data), with a parameter of its own."""

    def __init__(self, num_classes=10):
        super().__init__()
        nn = torch.nn
        self.offset = nn.Parameter(torch.zeros(1, 8, 1, 1))
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.tail = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x) + self.offset
        if x.mean() > -1e9:
            x = self.body(x)
        return self.head(self.tail(x).mean((2, 3)))


def test_a_network_torch_fx_cannot_trace_is_read_with_forward_hooks_through_both_stages(make_config, tmp_path):
    from fitnets_cli.networks.taps import Hooked

    torch.manual_seed(0)
    student = build_network(Network(_target_="test_timm.Gated"), SHAPE, 10)
    assert isinstance(student, Hooked) and "TraceError" in student.untraceable
    assert list(student.shapes) == ["stem.0", "stem.1", "stem", "body.0", "body.1", "body", "tail", "head"]
    assert student.shapes["body"] == (8, 14, 14) and student.shapes["head"] == (10,)
    x, ran = torch.rand(2, *SHAPE), []
    student.model.tail.register_forward_hook(lambda *a: ran.append("tail"))
    body = student.taps(x, ["body"])["body"]
    assert not ran and torch.equal(body, student.model.body(student.model.stem(x) + student.model.offset))
    assert torch.equal(student.taps(x, [None])[None], student(x)) and ran == ["tail", "tail"]
    # Stage 1 trains what the guided tap depends on: the stem, the body and the model's own offset; not the rest.
    cfg = make_config("train", ["dataset=mnist", "hints.regressor=auto", "recipe.student.lr=0.01",
                                "hints.pairs=[{hint: layer2, guided: body}]"])
    teacher = timm_net("test_resnet").eval().requires_grad_(False)
    stages = plan_stages(cfg, teacher, student)
    s = session(student, teacher, stages, torch.device("cpu"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    [hint] = train_stages(tiny_run(cfg, tmp_path), s, stages[:1], random_split(16, 0), None, [1])
    moved = {k.split(".")[1] for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"offset", "stem", "body"}, moved
    [kd] = train_stages(tiny_run(cfg, tmp_path), s, stages[1:], random_split(16, 0), None, [1])
    assert {k.split(".")[1] for k, v in student.state_dict().items() if not torch.equal(v, before[k])} >= {"tail", "head"}


def test_layers_lists_the_hooked_taps_of_a_network_torch_fx_cannot_trace():
    out = main("layers", "dataset=mnist", "student=module", "student._target_=test_timm.Gated")
    assert "read with forward hooks" in out and re.search(r"│ body.0 +│ 14x14x8 +│ <- guided", out), out


def test_compare_sets_ofas_published_fitnet_figures_under_runs_of_its_pairs():
    from fitnets_cli.commands.benchmark import benchmark_records, benchmark_table

    run = {"role": "student", "dataset": "cifar100_224", "teacher": "vit_small_patch16_224", "model": "resnet18",
           "seeds": 1, "test_acc": 70.5, "test_acc_last": 70.25}
    rows = [{**run, "schedule": "crd_fitnet"}, {**run, "schedule": "fitnets"}]
    header, lines = benchmark_table(benchmark_records(rows), "accuracy")
    assert header == ["method", "vit_small_patch16_224 -> resnet18"]
    assert lines == [["FitNet (crd_fitnet)", "70.25 (70.50)"], ["  published", "77.71"],
                     ["FitNets, two stages (fitnets)", "70.25 (70.50)"]]


class Passthrough(torch.nn.Module):
    """Parameters, but a forward pass that returns the images as they are: no layer to tap, no logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.unused = torch.nn.Linear(1, num_classes)

    def forward(self, x):
        return x


@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize("target, extra, says", [
    ("torch.nn.Conv2d", ["+{role}.in_channels=3", "+{role}.out_channels=4", "+{role}.kernel_size=3"],
     "network torch.nn.Conv2d outputs (4, 30, 30) for (3, 32, 32) images; fitnets needs (10,) logits"),
    ("test_timm.Gated", [], "network test_timm.Gated does not run on (3, 32, 32) images (RuntimeError: "),   # hooked
    ("torch.nn.Identity", [], "network torch.nn.Identity has no parameters, so it can be neither trained nor distilled"),
    ("torch.nn.Flatten", [], "network torch.nn.Flatten has no parameters"),
    ("test_timm.Passthrough", [], "network test_timm.Passthrough has no layers to tap: its forward pass returns its input"),
])
def test_a_module_that_cannot_be_a_student_or_teacher_stops_in_one_line(tmp_path, role, target, extra, says):
    schedule = "schedule=backprop" if role == "student" else "schedule=kd"
    line = failure("train", "dataset=cifar10", schedule, f"{role}=module", f"{role}._target_={target}",
                   *(e.format(role=role) for e in extra), f"hydra.run.dir={tmp_path / 'run'}")
    assert says in line, line
    assert not (tmp_path / "run").exists()
