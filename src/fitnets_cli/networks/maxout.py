"""The paper's networks, built from per-layer specs: maxout conv / maxout FC / softmax layers, named so hints
can refer to them. `Net` implements the network seam (networks/build.py) directly: its taps are its layers."""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Layer
from fitnets_cli.networks.taps import under


class Maxout(torch.autograd.Function):
    """The max over dim 2 (the pieces), with amax's gradient (tied pieces share it equally) in fewer passes
    than autograd's amax backward, which made FitNet-4's forward and backward 1.2x (fp32) to 1.7x (bf16)
    slower on a CPU (scripts/bench_maxout.py). Theano's max, in the authors' code, gives each tied piece the
    whole gradient; ties are common (MNIST's blank background), so that would change every published run."""

    @staticmethod
    def forward(ctx, z):
        ctx.two = z.shape[2] == 2
        if ctx.two:
            a, b = z.unbind(2)
            ctx.save_for_backward(a, b)
            return torch.maximum(a, b)
        out = z.amax(2)
        ctx.save_for_backward(z, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.two:
            a, b = ctx.saved_tensors
            share = (a - b).sign_().add_(1).mul_(0.5)   # a's share: 1 if it won, 0 if b did, 1/2 if tied
            to_a = grad * share
            return torch.stack([to_a, grad - to_a], 2)
        z, out = ctx.saved_tensors
        mask = (z == out.unsqueeze(2)).to(grad.dtype)
        return mask.mul_((grad / mask.sum(2)).unsqueeze(2))


class MaxoutLayer(nn.Module):
    """Conv or linear map to out*pieces units, max over the pieces, then an optional max-pool.

    Pooling uses ceil arithmetic, as pylearn2/cuda-convnet did: only it gives the paper's map sizes.
    """

    def __init__(self, spec: Layer, in_channels: int, dropout: float = 0.0, rescale: bool = True):
        super().__init__()
        self.spec = spec
        self.dropout = dropout
        # pylearn2 drops the input layer's units without rescaling the kept ones (input_scales 1).
        self.keep_scale = 1.0 if rescale else 1.0 - dropout
        pieces = spec.pieces if spec.kind != "softmax" else 1
        if spec.kind == "conv":
            self.map = nn.Conv2d(in_channels, spec.out * pieces, spec.kernel, padding=spec.pad)
        else:
            self.map = nn.Linear(in_channels, spec.out * pieces)
        self.pieces = pieces

    @torch.no_grad()
    def constrain(self) -> None:
        """Clip each filter's / unit's weight norm to max_norm (pylearn2's norm constraints); run after updates."""
        if self.spec.max_norm > 0:
            self.map.weight.copy_(self.map.weight.renorm(2, 0, self.spec.max_norm))

    def forward(self, x):
        if self.spec.kind != "conv":
            x = x.flatten(1)
        if self.training and self.dropout > 0:
            x = F.dropout(x, self.dropout) * self.keep_scale
        z = self.map(x)
        if self.pieces > 1:
            z = z.unflatten(1, (self.spec.out, self.pieces))
            # Without gradients (evaluation, and the exporters, which cannot trace a custom Function) the same max.
            z = Maxout.apply(z) if torch.is_grad_enabled() else z.amax(2)
        if self.spec.pool:
            # On CPU, max-pooling a channels_last map is several times faster than an NCHW one (same
            # values, same argmax indices), and worth the two layout copies around it.
            cpu = z.device.type == "cpu"
            if cpu:
                z = z.contiguous(memory_format=torch.channels_last)
            z = F.max_pool2d(z, self.spec.pool, self.spec.pool_stride or self.spec.pool, ceil_mode=True)
            if cpu:
                z = z.contiguous()
        return z


class Net(nn.Module):
    """A feed-forward stack of named maxout layers; each layer's output is a tap."""

    hint_point = None   # the paper's hint and guided layers are named in the YAML specs
    stages, tokens = [], {}   # (the seam's: no feature_info stages, no token sequences)

    def __init__(self, specs: list[Layer], in_shape, num_classes: int, dropout_input=0.0, dropout=0.0):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.num_classes = num_classes
        self.specs = [replace(s, out=num_classes) if s.kind == "softmax" else s for s in specs]
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"layer names must be unique, got {names}")
        if self.specs[-1].kind != "softmax":
            raise ConfigError(f"the last layer must be kind: softmax, got {self.specs[-1].kind}")
        self.layers = nn.ModuleDict()
        self.shapes = {}            # layer name -> output shape (C, H, W) or (units,)
        shape = self.in_shape
        with torch.no_grad():
            x = torch.zeros(1, *shape)
            for i, spec in enumerate(self.specs):
                if spec.kind == "conv" and len(shape) != 3:
                    raise ConfigError(f"layer {spec.name}: a conv layer cannot follow a flat layer")
                in_features = shape[0] if spec.kind == "conv" else math.prod(shape)
                layer = MaxoutLayer(spec, in_features, dropout_input if i == 0 else dropout, rescale=i > 0)
                try:
                    x = layer(x)
                except RuntimeError as err:
                    raise ConfigError(f"layer {spec.name} does not fit its {tuple(shape)} input: "
                                      f"{str(err).splitlines()[0]}") from None
                shape = tuple(x.shape[1:])
                self.layers[spec.name] = layer
                self.shapes[spec.name] = shape
        self.blocks = list(self.layers)   # the default-tap rule takes the middle of these ...
        self.groups = []                  # ... as the paper does: a maxout net has no groups of blocks

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return x

    def taps(self, x, names) -> dict:
        """{name: output} of the named layers (None: the logits), running only as deep as they need."""
        names = set(names)
        order = list(self.layers)
        depth = max(len(order) - 1 if n is None else order.index(n) for n in names)
        out = {}
        for name in order[: depth + 1]:
            x = self.layers[name](x)
            if name in names:
                out[name] = x
        if None in names:
            out[None] = x
        return out

    def depends(self, name: str) -> list[nn.Module]:
        """The layers up to and including `name`: what a hint stage trains."""
        order = list(self.layers)
        return [self.layers[n] for n in order[: order.index(name) + 1]]

    def submodules(self, prefix: str) -> list[nn.Module]:
        """The layers whose name starts with prefix."""
        return under(self.layers, prefix)

    def nonlinearity(self, name: str) -> tuple[str, int]:
        """The tap's non-linearity, which the paper's regressor copies: maxout and its pieces."""
        pieces = self.layers[name].pieces
        return ("maxout", pieces) if pieces > 1 else ("linear", 1)

    def compile(self, **kwargs) -> None:
        """torch.compile each layer, so every path through the net (up to any tap, or all of it) runs compiled."""
        for layer in self.layers.values():
            layer.compile(**kwargs)


def init_uniform(module: nn.Module, init_range: float) -> None:
    """Weights ~ U(-r, r), biases 0: the paper's initialisation."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.uniform_(m.weight, -init_range, init_range)
            nn.init.zeros_(m.bias)


def build_net(specs, in_shape, num_classes, init_range=0.005, dropout_input=0.0, dropout=0.0) -> Net:
    """Build a network from its layer specs and initialise it the paper's way."""
    net = Net(specs, in_shape, num_classes, dropout_input, dropout)
    init_uniform(net, init_range)
    return net


def paper_specs(specs: list[Layer]) -> list[Layer]:
    """The specs as the paper counted them (spec 2.8): FC maxout layers with 2 pieces."""
    return [replace(s, pieces=min(s.pieces, 2)) if s.kind == "fc" else s for s in specs]
