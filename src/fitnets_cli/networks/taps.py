"""Any nn.Module behind the network seam (networks/build.py): `Tapped` reads its taps from a torch.fx trace, `Hooked`,
for a module torch.fx cannot trace, with forward hooks. Token sequences are read as the maps of their patch tokens."""

import difflib
import math
import re

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from fitnets_cli.config.errors import ConfigError


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
        if not nodes:
            raise ConfigError(f"network {name} has no layers to tap: its forward pass returns its input as it is; "
                              f"a teacher or student computes ({num_classes},) logits from the images: name such a module")
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
        self.tokens = {tap: self._layout[node] for tap, node in self._node.items() if self._layout.get(node)}
        self.groups, self.stages, self.hint_point = landmarks(model, self.shapes, name)

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

    def submodules(self, prefix: str) -> list[nn.Module]:
        """The model's modules whose path starts with prefix (outermost only)."""
        return under(self.model, prefix)

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
        self.tokens = {tap: layout for tap, layout in self._layout.items() if layout and tap in self.shapes}
        self.groups, self.stages, self.hint_point = landmarks(model, self.shapes, name)

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

    def submodules(self, prefix: str) -> list[nn.Module]:
        """The model's modules whose path starts with prefix (outermost only)."""
        return under(self.model, prefix)

    def nonlinearity(self, name: str) -> tuple[str, int]:
        """relu where the tap is a ReLU module's output, else linear."""
        return ("relu", 1) if isinstance(self.model.get_submodule(name), nn.ReLU) else ("linear", 1)

    def compile(self, **kwargs) -> None:
        """torch.compile the model's forward."""
        self.model.compile(**kwargs)


def under(model: nn.Module, prefix: str) -> list[nn.Module]:
    """The modules whose path starts with prefix, less those inside another of them; none is a one-line error
    naming the closest paths."""
    found = [(n, m) for n, m in model.named_modules() if n and n.startswith(prefix)]
    outer = [m for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]
    if not outer:
        paths = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(prefix, paths, n=6, cutoff=0.5)
        raise ConfigError(f"no module of the student starts with {prefix!r}; closest: {', '.join(close) or 'none'} "
                          "(`fitnets layers` lists its taps, by module path)")
    return outer


def landmarks(model: nn.Module, shapes: dict, name: str) -> tuple[list[str], list[str], str | None]:
    """The taps the default hint/guided rule looks for: the model's groups of blocks, its timm feature_info
    stages (shallowest first) and the hint_point it names, which must be one of its taps."""
    groups = [path for path, child in model.named_children() if path in shapes
              and any(list(grandchild.children()) for grandchild in child.children())]
    stages = [f["module"] for f in getattr(model, "feature_info", []) if f.get("module") in shapes]
    hint_point = getattr(model, "hint_point", None)
    if hint_point is not None and hint_point not in shapes:
        raise ConfigError(f"network {name} names hint_point {hint_point!r}, which is not one of its taps")
    return groups, stages, hint_point


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
                          f"{' '.join(str(err).split())[:150]}); resize them to a size it takes "
                          "(dataset.resize=N for mnist, mnist_subset, cifar10, cifar100 and svhn; "
                          "dataset.images.size=N for image files) or build it for these (+teacher.img_size=... / "
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
