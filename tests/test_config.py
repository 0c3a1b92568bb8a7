from dataclasses import replace
from importlib import resources

import pytest
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException

from fitnets_cli.commands.compare import load_student
from fitnets_cli.config.errors import ConfigError
from fitnets_cli.networks import zoo
from fitnets_cli.networks.build import build_network
from fitnets_cli.training.hints import plan_hints
from helpers import failure


def options(group):
    folder = resources.files("fitnets_cli.conf").joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


FILES = ("imagefolder", "imagenet", "torchvision")   # datasets of image files: shapes come from the files


def student_dataset(student):
    return "mnist" if student == "fitnet_mnist" else "cifar10"


def test_the_groups_hold_the_issue_options():
    assert options("dataset") == ["cifar10", "cifar100", "cifar100_crd", "imagefolder", "imagenet", "mnist",
                                  "mnist_subset", "svhn", "torchvision"]
    assert options("schedule") == ["at", "at_kd", "backprop", "crd_fitnet", "dkd", "fitnets", "hint_joint", "kd", "pkt", "sp"]
    assert set(zoo.NETWORKS) == {"resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_2",
                                 "wrn_40_1", "wrn_40_2", "vgg8", "vgg13", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                                 "ResNet50"}
    assert {"maxout", "torchvision", "module", "zoo", "timm"} == set(options("teacher"))
    assert len(options("pair")) == 13 + 4   # the CRD benchmark's and OFA's heterogeneous pairs
    assert {"torchvision", "module", "zoo", "timm"} <= set(options("student"))
    assert {"fitnet1", "fitnet2", "fitnet3", "fitnet4", "fitnet_mnist", "depth5_30m", "depth11_107m"} <= set(options("student"))
    assert options("recipe") == sorted(options("dataset") + ["ofa_cifar100"])   # one per dataset, and OFA's


@pytest.mark.slow
@pytest.mark.parametrize("dataset", [d for d in options("dataset") if d not in FILES])
def test_every_dataset_composes_with_its_recipe_and_teacher(make_config, dataset):
    for command in ("train", "train_teacher", "compare"):
        cfg = make_config(command, [f"dataset={dataset}"])
        assert cfg.dataset.name == dataset.removesuffix("_crd") and cfg.teacher.name == "maxout"
    cfg = make_config("train", [f"dataset={dataset}"])
    family = {"cifar10": "cifar", "cifar100": "cifar", "cifar100_crd": "cifar", "svhn": "svhn"}.get(dataset, "mnist")
    assert cfg.teacher.layers == cfg.teacher.variants[family].layers
    assert cfg.recipe.student.lr == {"mnist": 0.0005, "mnist_subset": 0.002, "cifar100_crd": 0.05}.get(dataset, 0.005)


def test_the_imagenet_recipe_is_torchvisions_reference_and_its_lr_scales_with_the_global_batch(make_config):
    from fitnets_cli.training.loop import make_optimizer, set_hyper
    from torch import nn

    cfg = make_config("train", ["dataset=imagenet", "teacher=torchvision", "teacher.arch=resnet34",
                                "recipe.student.batch_size=512"])
    optim = cfg.recipe.student
    assert (optim.optimizer, optim.momentum, optim.weight_decay, optim.max_epochs) == ("sgd", 0.9, 1e-4, 90)
    assert cfg.recipe.teacher == replace(optim, batch_size=256)   # the teacher's batch was not overridden
    assert (cfg.dataset.images.size, cfg.dataset.images.resize, cfg.dataset.augment.resized_crop) == (224, 256, True)
    opt = make_optimizer([nn.Linear(2, 2)], [], optim)
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    lrs = [set_hyper(opt, optim, epoch, 0) for epoch in (0, 29, 30, 59, 60, 89)]
    assert lrs == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.002, 0.002])   # 0.1 per 256 images, x0.1 every 30


def test_the_imagenet_preset_pairs_resnet34_and_resnet18_at_layer3(make_config, tmp_path):
    cfg = make_config("train", ["experiment=imagenet_r34_r18", f"teacher.weights={tmp_path / 'r34.pth'}",
                                "schedule=fitnets"])
    assert (cfg.dataset.name, cfg.teacher.arch, cfg.student.arch, cfg.recipe.student.max_epochs) == \
        ("imagenet", "resnet34", "resnet18", 90)
    assert [(p.hint, p.guided) for p in cfg.hints.pairs] == [("layer3", "layer3")]
    shape = [3, 224, 224]
    teacher = build_network(replace(cfg.teacher, weights=None), shape, 1000)
    student = build_network(cfg.student, shape, 1000)
    [plan] = plan_hints(teacher, student, cfg.hints.pairs, cfg.hints)
    assert plan.hint_shape == plan.guided_shape == (256, 14, 14) and plan.make is None   # equal: no regressor


@pytest.mark.parametrize("dataset", FILES)
def test_image_file_datasets_compose_with_their_recipe(make_config, dataset):
    extra = ["dataset.images.cls=FashionMNIST"] if dataset == "torchvision" else []
    cfg = make_config("train", [f"dataset={dataset}", "teacher=torchvision", *extra])
    assert cfg.dataset.images.reader == {"imagefolder": "folder"}.get(dataset, dataset)
    assert cfg.dataset.in_shape is None and cfg.recipe.student.lr_batch == 256   # the shape comes from the files


@pytest.mark.parametrize("student", [s for s in options("student") if s not in ("torchvision", "module", "zoo", "timm")])
def test_every_paper_student_composes_and_its_paper_hint_pair_plans(make_config, student):
    dataset = student_dataset(student)
    cfg = make_config("train", [f"student={student}", f"dataset={dataset}"])
    shape = cfg.dataset.in_shape
    teacher = build_network(cfg.teacher, shape, 10)
    [plan] = plan_hints(teacher, build_network(cfg.student, shape, 10), cfg.hints.pairs, cfg.hints)
    assert plan.guided == cfg.student.guided and plan.hint == "conv2"


# The benchmark's feat[2] of each zoo network (RepDistiller's --hint_layer default), by the name of our tap.
HINT_POINTS = {"wrn_16_2": "block2", "wrn_40_1": "block2", "wrn_40_2": "block2", "vgg8": "block2", "vgg13": "block2",
               "MobileNetV2": "blocks.2"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(zoo.NETWORKS))
def test_every_zoo_network_composes_as_a_student_and_plans_from_its_hint_point(make_config, arch):
    cfg = make_config("train", ["student=zoo", f"student.arch={arch}", "dataset=cifar10"])
    teacher, student = (build_network(net, cfg.dataset.in_shape, 10) for net in (cfg.teacher, cfg.student))
    [plan] = plan_hints(teacher, student, cfg.hints.pairs, cfg.hints)
    assert plan.guided == student.hint_point == HINT_POINTS.get(arch, "layer2") and plan.hint == "conv2"


def test_a_zoo_network_is_a_student_and_a_teacher_by_its_name_alone(make_config):
    short = make_config("train", ["student=resnet8x4", "teacher=resnet32x4"])
    long = make_config("train", ["student=zoo", "student.arch=resnet8x4", "teacher=zoo", "teacher.arch=resnet32x4"])
    assert (short.student, short.teacher) == (long.student, long.teacher)
    assert (short.student.source, short.student.arch, short.teacher.arch) == ("zoo", "resnet8x4", "resnet32x4")
    assert short == long


def test_every_zoo_network_is_an_option_of_the_student_and_teacher_groups():
    with initialize_config_module("fitnets_cli.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group in ("student", "teacher"):
            found = loader.get_group_options(group)
            assert set(zoo.NETWORKS) <= set(found) and set(options(group)) <= set(found), group


ZOO_PAIRS = [p for p in options("pair") if all(n in zoo.NETWORKS for n in p.split("-"))]


@pytest.mark.parametrize("pair", ZOO_PAIRS)
def test_a_zoo_pair_preset_composes_to_its_two_networks(make_config, pair):
    teacher, student = pair.split("-")
    cfg = make_config("train", [f"pair={pair}"])
    named = make_config("train", [f"teacher={teacher}", f"student={student}"])
    assert (cfg.teacher.source, cfg.teacher.arch, cfg.student.source, cfg.student.arch) == \
        ("zoo", teacher, "zoo", student)
    assert (cfg.teacher, cfg.student) == (named.teacher, named.student)


def test_the_zoo_pairs_are_the_benchmarks_13():
    assert len(ZOO_PAIRS) == 13


@pytest.mark.parametrize("name", ["fitnet1", "fitnet_mnist", "depth5_30m", "timm", "resnet8x4", "ShuffleV2"])
def test_compare_composes_a_student_as_train_does(make_config, name):
    trained = make_config("train", [f"student={name}"]).student
    assert load_student(name) == trained                  # from Python: Hydra initialised for the call
    with initialize_config_module("fitnets_cli.conf", version_base="1.3"):
        assert load_student(name) == trained              # inside a Hydra app: its own initialisation
    assert not GlobalHydra.instance().is_initialized()    # nothing left behind


def test_compare_refuses_an_unknown_student_in_one_line_listing_the_options(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_student("resnet9")
    message = str(err.value)
    assert "\n" not in message and message.startswith("students: no student config 'resnet9'; options are ")
    assert all(name in message for name in options("student") + list(zoo.NETWORKS))
    assert failure("compare", "students=[resnet9]", f"hydra.run.dir={tmp_path / 'run'}").endswith(message)


@pytest.mark.parametrize("command, override, says", [
    ("train", "format=csv",
     "; format belongs to `fitnets compare` and `fitnets export`, not to `fitnets train`: drop it, or run"),
    ("eval", "recipe.student.lr=0.1", "recipe belongs to `fitnets train` and `fitnets train-teacher` and `fitnets layers`, not to"),
    ("eval", "schedule=kd", "defaults list; schedule belongs to `fitnets train` and `fitnets layers`, not to `fitnets eval`"),
    ("train-teacher", "student=fitnet4", "student belongs to `fitnets train` and `fitnets layers`"),
    ("compare", "resume=x", "resume belongs to `fitnets train` and `fitnets train-teacher`"),
    ("layers", "+format=csv", "`fitnets layers` has no key format; format belongs to `fitnets compare`"),
    ("train", "+bogus=1", "`fitnets train` has no key bogus; see its keys with `fitnets train --cfg job`"),
])
def test_a_key_of_another_command_is_refused_naming_the_command_it_belongs_to(tmp_path, command, override, says):
    assert says in failure(command, override, f"hydra.run.dir={tmp_path / 'run'}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("schedule", options("schedule"))
@pytest.mark.parametrize("hints", options("hints"))
def test_every_schedule_and_hints_option_composes(make_config, schedule, hints):
    cfg = make_config("train", [f"schedule={schedule}", f"hints={hints}"])
    terms = {"backprop": [["ce"]], "fitnets": [["hint"], ["ce", "kd"]], "hint_joint": [["ce", "hint"]],
             "crd_fitnet": [["ce", "hint"]], "kd": [["ce", "kd"]], "at": [["ce", "at"]], "sp": [["ce", "sp"]],
             "pkt": [["ce", "pkt"]], "dkd": [["ce", "dkd"]], "at_kd": [["ce", "kd", "at"]]}[schedule]
    assert cfg.schedule.name == schedule and [[t.term for t in st.terms] for st in cfg.schedule.stages] == terms


def test_svhn_default_hint_pair_joins_the_fitnets(make_config):
    for student in ("fitnet3", "fitnet4"):
        cfg = make_config("train", ["dataset=svhn", f"student={student}"])
        teacher = build_network(cfg.teacher, (3, 32, 32), 10)
        [plan] = plan_hints(teacher, build_network(cfg.student, (3, 32, 32), 10), cfg.hints.pairs, cfg.hints)
        assert plan.regressor == "3x3 conv, maxout x2"


def test_paper_versus_code_choices_are_reachable(make_config):
    cfg = make_config("train", ["dataset=mnist", "student=fitnet_mnist", "student.layers.4.pieces=4",
                                "student.layers.5.pieces=4", "teacher.variants.mnist.layers.2.pieces=4",
                                "recipe.kd.lam_end=0", "recipe.student.optimizer=sgd", "hints.reduction=code"])
    assert [l.pieces for l in cfg.student.layers[4:6]] == [4, 4] and cfg.teacher.layers[2].pieces == 4
    assert (cfg.recipe.kd.lam_end, cfg.recipe.student.optimizer, cfg.hints.reduction) == (0, "sgd", "code")


def test_unknown_keys_and_wrong_types_fail_at_composition(make_config):
    with pytest.raises(ConfigCompositionException):
        make_config("train", ["recipe.student.lrr=0.1"])
    with pytest.raises(ConfigCompositionException):
        make_config("train", ["recipe.student.batch_size=big"])
    with pytest.raises(ConfigCompositionException):
        make_config("train", ["student=fitnet99"])


@pytest.mark.parametrize("override,message", [
    ("recipe.student.max_epochs=0", "max_epochs must be > 0"),
    ("recipe.student.batch_size=-1", "batch_size must be > 0"),
    ("recipe.kd.tau=0", "tau must be > 0"),
    ("device=tpu", "device='tpu' is not one of auto, cpu, cuda"),
    ("schedule.stages.0.terms.0.term=distill", "term='distill' is not one of ce, kd, hint"),
    ("schedule.stages.1.terms.1.weight=-1", "term kd: weights must be >= 0"),
    ("schedule.stages.0.train=all", "stage hint: train='all' is not one of student, guided, modules"),
    ("schedule.stages.0.terms.0._target_=pkg.term", "a loss term sets one of term"),
    ("schedule.stages.1.terms.1.ramp=[5,2]", "ramp must be [first, last]"),
])
def test_bad_values_fail_with_a_message_naming_the_key(make_config, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        make_config("train", [override])
