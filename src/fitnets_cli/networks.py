"""The one seam between training and networks. Whatever its source, a network offers:

  in_shape, num_classes   what it takes and predicts
  shapes                  {tap: output shape, (C, H, W) or (units,)}, in forward order, probed by one pass
  taps(x, names)          {tap: output} (None: the logits), computed no deeper than the last tap needs
  depends(tap)            the modules whose parameters and buffers that output depends on (stage 1 trains them)
  nonlinearity(tap)       ("maxout", pieces) | ("relu", 1) | ("linear", 1): what the paper's regressor copies
  hint_point              the tap the network names as its default hint/guided point (a `hint_point`
                          attribute of the module, as the zoo's), or None
  stages, blocks, groups  its stages (a timm model's feature_info), module-level taps and groups of blocks, for
                          the default hint/guided rule
  tokens                  {tap: (prefix tokens, patch grid)} of the taps that output token sequences, which
                          `taps` and `shapes` give as maps of their patch tokens
  build_spec              how to build it again, recorded in checkpoints

The paper's maxout networks (models.Net) implement it directly. Any other nn.Module (a torchvision model, a
network of the zoo, a timm model, or the user's own by dotted path) is wrapped in `Tapped`, which reads its taps
from a torch.fx trace, or, where torch.fx cannot trace it, in `Hooked`, which reads them with forward hooks. A
module may declare a constraint to apply after every update with a `constrain()` method (maxout layers' max-norm).
"""

import copy
import difflib
import importlib
import inspect
import math
import re
from dataclasses import asdict, replace
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from fitnets_cli import zoo
from fitnets_cli.config import ConfigError, Layer, Network
from fitnets_cli.models import build_net, paper_specs


class Tapped(nn.Module):
    """Any nn.Module behind the seam. Taps are the torch.fx nodes of its forward pass, named by module path
    (`layer2`, `layer2.1.conv1`) or, for what a path cannot name, by FX node name (`layer2.1.add`, the sum of
    a residual block). A module that runs k > 1 times per pass has one tap per call: `path_0` ... `path_{k-1}`.
    Grey images go to a model whose first convolution takes more channels as that many copies.

    timm models are traced with timm's own leaf modules, so that taps are the model's layers, not their
    internals; their default hint point is the middle stage of `feature_info`. A tap that outputs a vision
    transformer's token sequence (prefix tokens, then a grid of patch tokens) is read as the map of its patch
    tokens, (C, H, W) on the patch grid, so that hints join CNNs and transformers; `tokens` records them."""

    def __init__(self, model: nn.Module, in_shape, num_classes: int, name: str):
        super().__init__()
        self.model = model
        self.in_shape, self.num_classes = tuple(in_shape), num_classes
        self.repeat = grey_copies(model, in_shape)
        self._extractors = {}   # frozenset of FX nodes -> truncated graph (not a submodule: no second state)
        self._compile = None    # torch.compile's arguments once compile() was called
        self._tracer = timm_tracer(model)
        try:
            nodes = get_graph_node_names(model, tracer_kwargs=self._fx_kwargs(), suppress_diff_warning=True)[1][1:]
        except Exception as err:
            raise Untraceable(f"{type(err).__name__}: {' '.join(str(err).split())[:150]}") from None
        leaves = {n for n, m in model.named_modules() if n and not list(m.children())}
        self._node = tap_names(nodes, leaves | set(self._tracer.get("leaf_names", ())))
        probe = create_feature_extractor(model, return_nodes=nodes, suppress_diff_warning=True,
                                         tracer_kwargs=self._fx_kwargs())
        outputs = probe_pass(probe, model, self._input(torch.zeros(2, *in_shape)), name, in_shape)
        self._layout = layouts(model, outputs)
        shape = {node: tuple(out.shape[1:]) for node, out in outputs.items()
                 if isinstance(out, torch.Tensor) and out.dim() > 1}
        self._logits = nodes[-1]
        check_logits(name, outputs[self._logits], in_shape, num_classes)
        for path, module in model.named_modules():   # a container's output is its last node's
            last = next((n for n in reversed(nodes) if n.startswith(path + ".")), None)
            if path and list(module.children()) and last in shape:
                self._node[path] = last
        # Forward order; where taps share a node (a block's output is its last op's), the deepest name first.
        order = {node: i for i, node in enumerate(nodes)}
        self._node = {tap: node for tap, node in sorted(self._node.items(), key=lambda kv: (order[kv[1]],
                      -kv[0].count("."))) if node in shape}
        self.shapes = {tap: shape[node] for tap, node in self._node.items()}
        modules = dict(model.named_modules())
        self.blocks = [t for t in self.shapes if t in modules or call_of(t) in modules]
        self.groups = [path for path, child in model.named_children() if path in self.shapes
                       and any(list(grandchild.children()) for grandchild in child.children())]
        stages = [f["module"] for f in getattr(model, "feature_info", []) if f.get("module") in self.shapes]
        self.hint_point = getattr(model, "hint_point", None)
        self.stages = stages   # timm's feature_info stages, shallowest first
        self.tokens = {tap: self._layout[node] for tap, node in self._node.items() if self._layout.get(node)}
        if self.hint_point is not None and self.hint_point not in self.shapes:
            raise ConfigError(f"network {name} names hint_point {self.hint_point!r}, which is not one of its taps")

    def _fx_kwargs(self) -> dict | None:
        return {k: v for k, v in self._tracer.items() if k != "leaf_names"} or None

    def _input(self, x):
        return x.expand(-1, self.repeat, -1, -1) if self.repeat > 1 else x

    def _extract(self, nodes):
        key = frozenset(nodes)
        if key not in self._extractors:
            gm = create_feature_extractor(self.model, return_nodes=sorted(key), suppress_diff_warning=True,
                                          tracer_kwargs=self._fx_kwargs())
            if self._compile is not None:
                gm.compile(**self._compile)
            self._extractors[key] = gm
        gm = self._extractors[key]
        if gm.training != self.training:
            gm.train(self.training)
        return gm

    def forward(self, x):
        return self.model(self._input(x))

    def taps(self, x, names) -> dict:
        """{tap: output} of the named taps (None: the logits), running only as deep as they need."""
        if set(names) == {None}:
            return {None: self(x)}
        nodes = {self._logits if n is None else self._node[n]: n for n in names}
        out = self._extract(nodes)(self._input(x))
        return {tap: as_map(out[node], self._layout[node]) if node in self._layout else out[node]
                for node, tap in nodes.items()}

    def depends(self, name: str) -> list[nn.Module]:
        """The network truncated at the tap, whose parameters and buffers are exactly those the tap's output
        depends on (with a transformer's class token and position embedding, which are the model's own)."""
        return [self._extract({self._node[name]})]

    def nonlinearity(self, name: str) -> tuple[str, int]:
        """relu where the tap is a ReLU's output (a module or F.relu), else linear."""
        node = call_of(self._node[name])
        module = dict(self.model.named_modules()).get(node)
        relu = isinstance(module, nn.ReLU) or (module is None and node.endswith("relu"))
        return ("relu", 1) if relu else ("linear", 1)

    def compile(self, **kwargs) -> None:
        """torch.compile the whole forward and every truncated forward made for taps."""
        self._compile = kwargs
        self.model.compile(**kwargs)
        for gm in self._extractors.values():
            gm.compile(**kwargs)


class Untraceable(Exception):
    """torch.fx cannot trace the model (why, in one line)."""


class Stop(Exception):
    """Raised by a forward hook once the taps a pass needs have run."""


class Hooked(nn.Module):
    """An nn.Module that torch.fx cannot trace (data-dependent control flow, say), behind the seam through forward
    hooks: its taps are the outputs of its modules that run once per pass, by module path, in the order they
    finish. A pass stops as soon as the taps it needs have run; stage 1 trains the modules that had finished by
    then and the parameters of those still running around them (a transformer's class token, say)."""

    def __init__(self, model: nn.Module, in_shape, num_classes: int, name: str, untraceable: str):
        super().__init__()
        self.model, self.untraceable = model, untraceable
        self.in_shape, self.num_classes = tuple(in_shape), num_classes
        self.repeat = grey_copies(model, in_shape)
        events, outputs = [], {}   # ("start" | "end", path) in call order; each module's first output

        def started(path):
            def hook(module, args):
                events.append(("start", path))
            return hook

        def ended(path):
            def hook(module, args, out):
                events.append(("end", path))
                outputs.setdefault(path, out)
            return hook

        handles = [h for path, m in model.named_modules()
                   for h in (m.register_forward_pre_hook(started(path)), m.register_forward_hook(ended(path)))]
        try:
            logits = probe_pass(model, model, self._input(torch.zeros(2, *in_shape)), name, in_shape)
        finally:
            for h in handles:
                h.remove()
        check_logits(name, logits, in_shape, num_classes)
        self._layout = layouts(model, outputs)
        ends = [path for kind, path in events if kind == "end"]
        self._events = events
        self.shapes = {path: tuple(outputs[path].shape[1:]) for path in dict.fromkeys(ends)
                       if path and ends.count(path) == 1 and isinstance(outputs[path], torch.Tensor)
                       and outputs[path].dim() > 1}
        self.blocks = list(self.shapes)
        self.groups = [path for path, child in model.named_children() if path in self.shapes
                       and any(list(grandchild.children()) for grandchild in child.children())]
        self.stages = [f["module"] for f in getattr(model, "feature_info", []) if f.get("module") in self.shapes]
        self.hint_point = getattr(model, "hint_point", None)
        self.tokens = {tap: layout for tap, layout in self._layout.items() if layout and tap in self.shapes}
        if self.hint_point is not None and self.hint_point not in self.shapes:
            raise ConfigError(f"network {name} names hint_point {self.hint_point!r}, which is not one of its taps")

    def _input(self, x):
        return x.expand(-1, self.repeat, -1, -1) if self.repeat > 1 else x

    def forward(self, x):
        return self.model(self._input(x))

    def taps(self, x, names) -> dict:
        """{tap: output} of the named taps (None: the logits), stopping the pass once they have run."""
        wanted, got = [n for n in names if n is not None], {}

        def grab(path):
            def hook(module, args, out):
                got[path] = out
                if None not in names and len(got) == len(wanted):
                    raise Stop
            return hook

        handles = [self.model.get_submodule(n).register_forward_hook(grab(n)) for n in wanted]
        logits = None
        try:
            logits = self(x)
        except Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        out = {n: as_map(got[n], self._layout[n]) if n in self._layout else got[n] for n in wanted}
        return {**out, None: logits} if None in names else out

    def depends(self, name: str) -> list[nn.Module]:
        """The modules that finished before the tap's output did, and a holder of the own parameters and buffers
        of the modules still running around it (the model's own, such as a class token)."""
        until = self._events.index(("end", name))
        done = {path for kind, path in self._events[:until + 1] if kind == "end"}
        running = {path for kind, path in self._events[:until + 1] if kind == "start"} - done
        modules = dict(self.model.named_modules())
        outermost = [p for p in done if not any(p.startswith(q + ".") for q in done if q)]
        holder = nn.Module()
        for path in sorted(running):
            for key, p in modules[path].named_parameters(prefix=path, recurse=False):
                holder.register_parameter(key.replace(".", "_"), p)
            for key, b in modules[path].named_buffers(prefix=path, recurse=False):
                holder.register_buffer(key.replace(".", "_"), b)
        return [modules[p] for p in sorted(outermost)] + [holder]

    def nonlinearity(self, name: str) -> tuple[str, int]:
        """relu where the tap is a ReLU module's output, else linear."""
        return ("relu", 1) if isinstance(self.model.get_submodule(name), nn.ReLU) else ("linear", 1)

    def compile(self, **kwargs) -> None:
        """torch.compile the model's forward."""
        self.model.compile(**kwargs)


def grey_copies(model: nn.Module, in_shape) -> int:
    """How many copies of a grey image a model takes: its first convolution's input channels, or 1."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first and in_shape[0] == 1 and first.in_channels > 1 else 1


def probe_pass(run: nn.Module, model: nn.Module, x, name: str, in_shape):
    """run(x) (the model, or a graph of it) in eval mode without gradients, the model's mode restored after; a
    forward pass that fails on the data's images stops in one line."""
    was = model.training
    try:
        with torch.no_grad():
            return run.eval()(x)
    except Exception as err:
        raise ConfigError(f"network {name} does not run on {tuple(in_shape)} images ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:150]}); give the images the size it takes "
                          "(dataset.images.size=...) or build it for these (+teacher.img_size=... / "
                          "+student.img_size=...)") from None
    finally:
        model.train(was)


def check_logits(name: str, logits, in_shape, num_classes: int) -> None:
    """Stop in one line unless the model's output is (num_classes,) logits."""
    shape = tuple(logits.shape[1:]) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if shape != (num_classes,):
        raise ConfigError(f"network {name} outputs {shape} for {tuple(in_shape)} images; fitnets needs "
                          f"({num_classes},) logits (pass num_classes to it)")


def layouts(model: nn.Module, outputs: dict) -> dict:
    """Outputs that are maps in another layout: token sequences ({key: (prefix tokens, patch grid)}) and, in a
    channels-last model such as Swin, (N, H, W, C) maps ({key: None}); those outputs become maps in place."""
    found = {}
    prefix, grid = getattr(model, "num_prefix_tokens", None), getattr(getattr(model, "patch_embed", None),
                                                                      "grid_size", None)
    for key, out in outputs.items():
        if not isinstance(out, torch.Tensor):
            continue
        if prefix is not None and grid and out.dim() == 3 and out.shape[1] == prefix + math.prod(grid):
            found[key] = (prefix, tuple(grid))
        elif getattr(model, "output_fmt", None) == "NHWC" and out.dim() == 4:
            found[key] = None
        if key in found:
            outputs[key] = as_map(out, found[key])
    return found


def timm_tracer(model: nn.Module) -> dict:
    """torch.fx tracer settings for a timm model: timm's leaf modules and functions (`leaf_names`: the paths of
    the model's leaf modules among them); none for other models."""
    if not type(model).__module__.startswith("timm."):
        return {}
    from timm.layers import get_notrace_functions, get_notrace_modules

    leaf = tuple(get_notrace_modules())
    return {"leaf_modules": list(leaf), "autowrap_functions": list(get_notrace_functions()),
            "leaf_names": [n for n, m in model.named_modules() if n and isinstance(m, leaf)]}


def as_map(out: torch.Tensor, tokens: tuple | None) -> torch.Tensor:
    """An (N, C, H, W) map from a token sequence (N, prefix + H*W, C), `tokens` = (prefix, (H, W)): its patch
    tokens on their grid; or, with tokens None, from a channels-last (N, H, W, C) map."""
    if tokens is None:
        return out.permute(0, 3, 1, 2)
    prefix, grid = tokens
    return out[:, prefix:].transpose(1, 2).reshape(len(out), out.shape[2], *grid)


def tap_names(nodes: list[str], leaves: set[str]) -> dict[str, str]:
    """{tap name: FX node}: the node names, except that a leaf module run k > 1 times (FX: path, path_1, ...)
    gets path_0 ... path_{k-1}, so that its bare path, which would be ambiguous, names no tap."""
    calls = {}
    for node in nodes:
        calls.setdefault(call_of(node) if call_of(node) in leaves else node, []).append(node)
    taps = {}
    for base, called in calls.items():
        taps.update({f"{base}_{i}": n for i, n in enumerate(called)} if len(called) > 1 else {called[0]: called[0]})
    return taps


def call_of(node: str) -> str:
    """The module path or op of an FX node name, less FX's call counter (`layer1.0.relu_1` -> `layer1.0.relu`)."""
    return re.sub(r"_\d+$", "", node)


def check_tap(net, name: str, role: str) -> None:
    """A one-line error naming the closest taps when `name` is not a tap of `net`."""
    if name in net.shapes:
        return
    calls = [t for t in net.shapes if re.fullmatch(re.escape(name) + r"_\d+", t)]
    if calls:
        raise ConfigError(f"{role} layer {name!r} runs {len(calls)} times in one forward pass; name one call: "
                          f"{', '.join(calls)}")
    ratio = {tap: difflib.SequenceMatcher(None, name, tap).ratio() for tap in net.shapes}
    close = [tap for tap in sorted(ratio, key=lambda t: -ratio[t]) if ratio[tap] >= 0.5][:6]   # ties: forward order
    raise ConfigError(f"{role} layer {name!r} does not exist; closest: {', '.join(close) or 'none'} "
                      "(`fitnets layers` lists them all)")


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


def count(spec: Network, in_shape, num_classes: int, counting: str = "actual") -> dict:
    """Weight layers (conv and linear), parameters, multiplications and FLOPs of one image's forward pass.

    FLOPs come from torch.utils.flop_counter (2 x multiply-adds; max, pooling and adds are not counted).
    counting='paper' counts as the paper did (spec 2.8): weights only, and FC maxout layers as 2 pieces.
    """
    if counting == "paper" and spec.layers:
        spec = replace(spec, layers=paper_specs(spec.layers))
    net = build_network(replace(spec, weights=None), in_shape, num_classes).eval()
    params = sum(p.numel() for n, p in net.named_parameters() if counting == "actual" or n.endswith("weight"))
    layers = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) for m in net.modules())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, *in_shape))
    flops = counter.get_total_flops()
    return {"layers": layers, "params": params, "mults": flops // 2, "flops": flops}
