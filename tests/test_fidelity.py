"""The settings that follow the authors' code (adri-romsor/FitNets, pylearn2) replay it exactly, and every
setting the schema accepts is used."""

import ast
import dataclasses
import json
import re
import typing
from importlib import resources
from pathlib import Path

import pytest
import torch
import torchvision

import fitnets_cli
from fitnets_cli.config import commands, groups
from fitnets_cli.data.load import load_data
from fitnets_cli.training.loop import set_hyper

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


@pytest.mark.slow
def test_student_dropout_is_applied(tiny, tmp_path):
    runs = {}
    for p in (0.0, 0.5):
        call("train", *tiny, "student=fitnet_mnist", "schedule=backprop", "recipe.student.max_epochs=1",
             f"recipe.student.dropout={p}", f"hydra.run.dir={tmp_path / str(p)}")
        runs[p] = json.loads((tmp_path / str(p) / "metrics.json").read_text())
    first = lambda p: runs[p]["stages"][0]["history"][0]
    assert first(0.0)["train_ce"] != first(0.5)["train_ce"]


@pytest.mark.slow
def test_settings_that_would_have_no_effect_are_rejected(tiny, tmp_path):
    for override, words in [("recipe.student.momentum=0.9", "optimizer=sgd only"),
                            ("recipe.student.lr_decay_factor=0.1", "lr_decay_saturate > 0"),
                            ("recipe.student.batch_size=1000", "leaves no batch")]:
        extra = ["recipe.student.drop_last=true"] if "batch_size" in override else []
        assert words in failure("train", *tiny, "schedule=backprop", override, *extra, f"hydra.run.dir={tmp_path / 'r'}")


def schema_types() -> dict[str, type]:
    """Every config schema by class name: the groups' and the commands'."""
    return {c.__name__: c for module in (groups, commands) for c in vars(module).values()
            if isinstance(c, type) and dataclasses.is_dataclass(c)}


def inner(tp) -> set[str]:
    """The schema classes a field's type names (inside Optional, List, Dict)."""
    if dataclasses.is_dataclass(tp):
        return {tp.__name__}
    return set().union(*(inner(a) for a in typing.get_args(tp)))


def chains(tree) -> list[list[str]]:
    """Every attribute chain read in a module (`cfg.recipe.kd.tau` -> [cfg, recipe, kd, tau]), getattr(x, "f")
    counted as x.f."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            node = ast.Attribute(value=node.args[0], attr=node.args[1].value)
        if not isinstance(node, ast.Attribute):
            continue
        chain = [node.attr]
        while isinstance(node.value, (ast.Attribute, ast.Call)) or isinstance(node.value, ast.Name):
            node = node.value.func if isinstance(node.value, ast.Call) else node.value
            if isinstance(node, ast.Name):
                chain.append(node.id)
                break
            if not isinstance(node, ast.Attribute):
                break
            chain.append(node.attr)
        found.append(chain[::-1])
    return found


def holders(trees, schemas) -> dict[str, set[str]]:
    """The names that hold each schema in the code: the fields of that type, parameters annotated with it,
    `cfg` (every command's root), and variables assigned from a chain that ends in a holder."""
    held = {name: set() for name in schemas}
    for c in schemas.values():
        for f in dataclasses.fields(c):
            for name in inner(typing.get_type_hints(c).get(f.name, f.type)):
                held[name].add(f.name)
    for name, c in schemas.items():
        if issubclass(c, commands.Common):
            held[name] |= {"cfg", "config"}
    named = lambda annotation: {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)} if annotation else set()
    returns = {}   # function name -> the schemas its return annotation names
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.arg):
                for name in named(node.annotation) & set(held):
                    held[name].add(node.arg)
            if isinstance(node, ast.FunctionDef):
                returns[node.name] = named(node.returns) & set(held)
    for _ in range(3):   # aliases of aliases
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                    target, value = node.targets[0].id, node.value
                elif isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
                    target, value = node.target.id, node.iter   # an element of a list of schemas
                else:
                    continue
                if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
                    for name in returns.get(value.func.id, ()):
                        held[name].add(target)
                last = value.attr if isinstance(value, ast.Attribute) else value.id if isinstance(value, ast.Name) \
                    else None
                for name in held:
                    if last in held[name]:
                        held[name].add(target)
    for name, c in schemas.items():   # what holds a schema holds its bases' fields too
        for base in c.__mro__[1:]:
            if base.__name__ in held:
                held[base.__name__] |= held[name]
    return held


def unread(sources: list[str], yaml_refs: list[str]) -> list[str]:
    """The schema fields that no `holder.field` read in the sources, nor a ${...} interpolation, reaches."""
    trees = [ast.parse(s) for s in sources]
    schemas = schema_types()
    held = holders(trees, schemas)
    pairs = {tuple(chain[i:i + 2]) for tree in trees for chain in chains(tree) for i in range(len(chain) - 1)}
    for ref in yaml_refs:
        parts = ["cfg", *filter(None, ref.split("."))]
        pairs |= {tuple(parts[i:i + 2]) for i in range(len(parts) - 1)}
    missing = []
    for name, c in schemas.items():
        for f in dataclasses.fields(c):
            owner = next(b for b in reversed(c.__mro__) if f.name in getattr(b, "__dataclass_fields__", {}))
            if owner is c and not any((h, f.name) in pairs for h in held[name]) and f.name != "command":
                missing.append(f"{name}.{f.name}")
    return missing


def test_every_schema_field_is_read_where_its_schema_is_held():
    # A field counts as read only as `holder.field`, where the holder is a name that holds its schema (a
    # field of that type, an annotated parameter, an alias): another class's attribute of the same name
    # does not count. Every command's schema is covered, and interpolations in conf/ count as reads.
    src = Path(fitnets_cli.__file__).parent
    sources = [p.read_text() for p in src.rglob("*.py") if "conf" not in p.relative_to(src).parts[:1]]
    refs = []
    for p in Path(str(resources.files("fitnets_cli.conf"))).rglob("*.yaml"):
        text = p.read_text()
        while "${" in text:   # innermost first: ${.variants.${dataset.family}.hint} reads dataset.family, then
            found = re.findall(r"\$\{([\w.]*)\}", text)   # teacher.variants.hint
            if not found:
                break
            refs += [f"{p.parent.name}{ref}" if ref.startswith(".") else ref for ref in found]
            text = re.sub(r"\$\{[\w.]*\}", "", text)
    assert not unread(sources, refs), f"accepted but never read: {unread(sources, refs)}"


def test_the_field_check_tells_a_read_from_a_namesake():
    # Augment.pad read as augment.pad counts; F.pad (another object's pad) does not.
    assert "Augment.pad" not in unread(["def f(augment: Augment):\n    return augment.pad"], [])
    assert "Augment.pad" in unread(["import torch.nn.functional as F\nF.pad(x, (1, 1))"], [])
    assert "TrainConfig.teacher_cache" in unread(["x.teacher_cache"], [])
    assert "TrainConfig.teacher_cache" not in unread(["cfg.teacher_cache"], [])
