"""The one seam between training and networks. Whatever its source, a network offers:

  in_shape, num_classes   what it takes and predicts
  shapes                  {tap: output shape, (C, H, W) or (units,)}, in forward order, probed by one pass
  taps(x, names)          {tap: output} (None: the logits), computed no deeper than the last tap needs
  depends(tap)            the modules whose parameters and buffers that output depends on (stage 1 trains them)
  submodules(prefix)      the modules whose path starts with prefix (a stage with train=modules trains them)
  nonlinearity(tap)       ("maxout", pieces) | ("relu", 1) | ("linear", 1): what the paper's regressor copies
  hint_point              the tap the network names as its default hint/guided point (a `hint_point`
                          attribute of the module, as the zoo's), or None
  stages, blocks, groups  its stages (a timm model's feature_info), module-level taps and groups of blocks, for
                          the default hint/guided rule
  tokens                  {tap: (prefix tokens, patch grid)} of the taps that output token sequences, which
                          `taps` and `shapes` give as maps of their patch tokens
  build_spec              how to build it again, recorded in checkpoints

The paper's maxout networks (maxout.Net) implement it directly. Any other nn.Module (a torchvision model, a
network of the zoo, a timm model, or the user's own by dotted path) is wrapped in `Tapped`, which reads its taps
from a torch.fx trace, or, where torch.fx cannot trace it, in `Hooked`, which reads them with forward hooks (both
in taps.py). A module may declare a constraint to apply after every update with a `constrain()` method (maxout
layers' max-norm).
"""

import copy
import difflib
import importlib
import inspect
import re
from dataclasses import asdict, replace
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Layer, Network
from fitnets_cli.networks import zoo
from fitnets_cli.networks.maxout import build_net, paper_specs
from fitnets_cli.networks.taps import Hooked, Tapped, Untraceable


def build_network(spec: Network, in_shape, num_classes: int, init_range: float = 0.005, dropout_input: float = 0.0,
                  dropout: float = 0.0) -> nn.Module:
    """Build a network from its config. Initialisation and dropout settings apply to the paper's maxout
    networks; torchvision models and your own keep their own. `spec.weights` is loaded last."""
    if spec.layers:
        net = build_net(spec.layers, in_shape, num_classes, init_range, dropout_input, dropout)
        net.build_spec = build_spec(spec, net.specs)
    else:
        model = timm_model(spec, num_classes, in_shape) if spec.source == "timm" else \
            instantiate(spec, num_classes, in_shape[0])
        if next(model.parameters(), None) is None:
            raise ConfigError(f"network {spec.name} has no parameters, so it can be neither trained nor distilled "
                              f"from; a teacher or student is a classifier with trainable layers that outputs "
                              f"({num_classes},) logits: name such a module")
        try:
            net = Tapped(model, in_shape, num_classes, spec.name)
        except Untraceable as why:
            net = Hooked(model, in_shape, num_classes, spec.name, str(why))
        net.build_spec = build_spec(spec)
    if spec.weights and spec.source != "timm" and not weight_name(spec):   # else timm or torchvision loaded them
        load_weights(net, spec.weights, spec.name)
    return net


def instantiate(spec: Network, num_classes: int, in_channels: int) -> nn.Module:
    """The nn.Module of a torchvision builder, a zoo network or a dotted path; nothing is downloaded. Builders
    that take `num_classes` or `in_channels` (the zoo's) get the dataset's."""
    if spec.source == "zoo":
        if spec.arch not in zoo.NETWORKS:
            close = difflib.get_close_matches(spec.arch, list(zoo.NETWORKS))
            raise ConfigError(f"arch={spec.arch!r} is not a network of the zoo; closest: {', '.join(close) or 'none'} "
                              f"(all: {', '.join(zoo.NETWORKS)})")
        make, kwargs = zoo.NETWORKS[spec.arch], dict(spec.kwargs)
    elif spec.arch:
        if spec.arch not in torchvision.models.list_models(module=torchvision.models):
            close = difflib.get_close_matches(spec.arch, torchvision.models.list_models(module=torchvision.models))
            raise ConfigError(f"arch={spec.arch!r} is not a torchvision.models classifier; closest: "
                              f"{', '.join(close) or 'none'}")
        make, kwargs = getattr(torchvision.models, spec.arch), {"weights": None, **spec.kwargs}
        if weight_name(spec):
            return torchvision_pretrained(spec, make, kwargs, num_classes)
    else:
        module, _, attr = spec._target_.rpartition(".")
        try:
            make = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ConfigError(f"_target_={spec._target_}: cannot import it ({err}); is its package installed "
                              "or on PYTHONPATH?") from None
        kwargs = dict(spec.kwargs)
    takes = inspect.signature(make).parameters
    if "num_classes" in takes or any(p.kind == p.VAR_KEYWORD for p in takes.values()):
        kwargs.setdefault("num_classes", num_classes)
    if "in_channels" in takes:
        kwargs.setdefault("in_channels", in_channels)
    try:
        model = make(**kwargs)
    except TypeError as err:
        raise ConfigError(f"network {spec.name}: {err}; check its keyword arguments") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"network {spec.name}: {spec._target_ or spec.arch} made a {type(model).__name__}, "
                          "not an nn.Module")
    return model


def weight_name(spec: Network) -> str | None:
    """The torchvision weight name a spec asks for (weights=IMAGENET1K_V1; pretrained=true: DEFAULT), else None."""
    if spec.source != "torchvision":
        return None
    if spec.pretrained:
        return "DEFAULT"
    return spec.weights if spec.weights and re.fullmatch(r"[A-Z][A-Z0-9_]*", spec.weights) else None


def torchvision_pretrained(spec: Network, make, kwargs: dict, num_classes: int) -> nn.Module:
    """A torchvision model with its named weights, from the torch hub cache as torchvision takes them (a download
    where there is a network); a head of another class count is replaced by a fresh one for the dataset's."""
    enum, name = torchvision.models.get_model_weights(make), weight_name(spec)
    if name != "DEFAULT" and name not in enum.__members__:
        raise ConfigError(f"network {spec.name}: torchvision has no weights {name} for it; its weights: DEFAULT, "
                          f"{', '.join(enum.__members__)}")
    weights = enum.DEFAULT if name == "DEFAULT" else enum[name]
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:
        model = make(**{**kwargs, "weights": weights})
    except TypeError as err:
        raise ConfigError(f"network {spec.name}: {err}; check its keyword arguments") from None
    except Exception as err:
        raise ConfigError(f"network {spec.name}: weights {name} looked for {file} in the torch hub cache and could "
                          f"not download it ({' '.join(str(err).split())[:150]}); run once with a network, copy "
                          "the file there (TORCH_HOME moves the cache), or pass weights=PATH") from None
    classes = len(weights.meta["categories"])
    path, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    if head.out_features != classes:
        raise ConfigError(f"network {spec.name}: its last linear layer {path} is not its {classes}-class head, "
                          "which fitnets would replace for the dataset's classes; pass weights=PATH instead")
    if classes != num_classes:
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Linear(head.in_features, num_classes))
    return model


def timm_model(spec: Network, num_classes: int, in_shape) -> nn.Module:
    """A timm model by name for the dataset's classes, channels and, where the model takes one, image size. Weights
    come through timm's own pretrained path, which drops a head of another class count and adapts the first
    convolution to other channels: spec.weights (a file), or spec.pretrained (the model's default weights, from
    the Hugging Face cache, downloaded where there is a network)."""
    import timm   # only timm networks need it

    if spec.arch not in timm.list_models():
        close = difflib.get_close_matches(spec.arch, timm.list_models(), n=5)
        raise ConfigError(f"arch={spec.arch!r} is not a timm model; closest: {', '.join(close) or 'none'} "
                          "(timm.list_models() lists them)")
    load = {}
    if spec.weights:
        if not Path(spec.weights).is_file():
            raise ConfigError(f"weights file {spec.weights} for {spec.name} does not exist")
        load = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(spec.weights)}}
    elif spec.pretrained:
        load = {"pretrained": True}
    kwargs = {"num_classes": num_classes, "in_chans": in_shape[0], **load}
    sized = {"img_size": tuple(in_shape[1:]), **spec.kwargs}
    try:
        try:
            return timm.create_model(spec.arch, **kwargs, **sized)
        except TypeError as err:   # a model without an image size (a CNN)
            if "img_size" not in str(err) or "img_size" in spec.kwargs:
                raise
            return timm.create_model(spec.arch, **kwargs, **spec.kwargs)
    except TypeError as err:
        raise ConfigError(f"network {spec.name}: {err}; check its keyword arguments") from None
    except Exception as err:
        if not load:
            raise
        raise ConfigError(f"network {spec.name}: {pretrained_missing(spec, err)}") from None


def pretrained_missing(spec: Network, err: Exception) -> str:
    """Why a timm model's weights did not load, and how to provide them."""
    reason = " ".join(str(err).split())[:200]
    if spec.weights:
        return f"the weights file {spec.weights} does not load ({reason})"
    import timm
    from huggingface_hub.constants import HF_HUB_CACHE

    hub = timm.get_pretrained_cfg(spec.arch)
    where = f"{hub.hf_hub_id} ({hub.hf_hub_filename or 'model.safetensors'})" if hub and hub.hf_hub_id else "its weights"
    return (f"pretrained=true looked for {where} in the Hugging Face cache {HF_HUB_CACHE} and could not fetch it "
            f"({reason}); run once with a network, copy the cache here, or pass weights=PATH")


def build_spec(spec: Network, specs: list[Layer] | None = None) -> dict:
    """What rebuilds a network (its layers as built, with the softmax's classes filled in), as plain data."""
    return {"name": spec.name, "source": spec.source, "layers": [asdict(s) for s in specs or []], "arch": spec.arch,
            "_target_": spec._target_, "kwargs": dict(spec.kwargs)}


def network_of(build: dict) -> Network:
    """The config that `build_spec` recorded."""
    return Network(**{**build, "layers": [Layer(**layer) for layer in build["layers"]]})


def load_weights(net: nn.Module, path: str, name: str) -> None:
    """Load a plain state_dict file (or a dict holding one under "state_dict" or "model", beside other entries
    such as the epoch, the accuracy or the optimiser's state, as RepDistiller's checkpoints) into the network."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} for {name} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"weights file {path} is unreadable ({str(err).splitlines()[0][:120]})") from None
    held = [state.get(k) for k in ("state_dict", "model")] if isinstance(state, dict) else []
    state = next((h for h in held if isinstance(h, dict)), state)
    target = net.model if isinstance(net, (Tapped, Hooked)) else net
    try:
        target.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ConfigError(f"weights file {path} does not fit {name}: "
                          f"{' '.join(str(err).split())[:300]}") from None


def snapshot_weights(modules: list[nn.Module]) -> list[dict]:
    """Copies of the modules' weights and buffers, for best-epoch keeping."""
    return [copy.deepcopy(m.state_dict()) for m in modules]


def restore_weights(modules: list[nn.Module], states: list[dict]) -> None:
    """Put back what `snapshot_weights` copied."""
    for module, state in zip(modules, states):
        module.load_state_dict(state)


def constraints(modules: list[nn.Module]) -> list[nn.Module]:
    """The modules among these (and inside them) that declare a constraint to apply after every update."""
    return [m for top in modules for m in top.modules() if callable(getattr(m, "constrain", None))]


def count(net: nn.Module, counting: str = "actual") -> dict:
    """Weight layers (conv and linear), parameters, multiplications and FLOPs of a built network's forward pass
    on one image.

    FLOPs come from torch.utils.flop_counter (2 x multiply-adds; max, pooling and adds are not counted).
    counting='paper' counts as the paper did (spec 2.8): weights only, and FC maxout layers as 2 pieces (counted
    on a maxout network built with those pieces).
    """
    if counting == "paper" and net.build_spec["layers"]:
        spec = network_of(net.build_spec)
        net = build_network(replace(spec, layers=paper_specs(spec.layers)), net.in_shape, net.num_classes)
    params = sum(p.numel() for n, p in net.named_parameters() if counting == "actual" or n.endswith("weight"))
    layers = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) for m in net.modules())
    was = net.training
    x = torch.zeros(1, *net.in_shape, device=next(net.parameters()).device)
    # Eagerly, even where the network was compiled: the counter sees the operations, not a compiled graph.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.compiler.set_stance("force_eager"):
        net.eval()(x)
    net.train(was)
    flops = counter.get_total_flops()
    return {"layers": layers, "params": params, "mults": flops // 2, "flops": flops}
