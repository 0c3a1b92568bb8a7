"""The CIFAR networks of the CRD distillation benchmark (Tian et al., ICLR 2020), as plain nn.Modules reached
through the network seam like any other module: `teacher=NAME`, `student=NAME` (or the long form
`teacher=zoo teacher.arch=NAME`, `student=zoo student.arch=NAME`). Each network is named once, where it is
defined: `@network` (or `network(partial(...), NAME)` for a setting of a class) enters it in NETWORKS and
stores its name as an option of the `student` and `teacher` config groups (Hydra's ConfigStore), which
composition sees once this module is imported.

Written after the benchmark's reference code, HobbitLong/RepDistiller models/ (also used by mdistiller), with
the same layers, parameter counts, initialisation and state_dict keys, so that its published checkpoints load
with `teacher.weights=PATH`. Two changes let them take other inputs, with identical results on 3x32x32:
`in_channels` (1 for MNIST) and global average pooling where the reference code pools a fixed window (8x8 or
4x4, the final map of a 32x32 image). RepDistiller's VGG adds a fourth max-pool for 64x64 inputs only; it is
left out. The benchmark's hint point, its feat[2], is each network's second stage (`layer2`, `block2`,
`blocks.2`; VGG's third block, `block2`): each class names it in `hint_point`, which the seam offers as the
network's default hint and guided tap.
"""

from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from torch import nn

# The networks `source: zoo` builds, by the names the benchmark gives them: name -> builder(num_classes=100,
# in_channels=3), filled by @network.
NETWORKS = {}


def network(make, name: str | None = None):
    """Enter a builder (a function, class or partial taking num_classes and in_channels) in NETWORKS under its
    name (its own, else `name`), and offer that name as a config option: `student=NAME` and `teacher=NAME` are
    `source: zoo, arch: NAME`."""
    name = name or make.__name__
    NETWORKS[name] = make
    for group in ("student", "teacher"):
        ConfigStore.instance().store(group=group, name=name, node={"source": "zoo", "arch": name})
    return make


def conv3x3(c_in: int, c_out: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=bias)


def conv1x1(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride, groups=groups, bias=False)


def conv_bn_relu(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


def he_init(net: nn.Module, linear: str = "default") -> nn.Module:
    """The reference code's initialisation: convolutions He-normal over fan-out with zero biases, batch norm
    at 1 and 0; the classifier keeps torch's default (`default`), gets zero biases (`zero_bias`, the WRNs) or
    N(0, 0.01) weights and zero biases (`normal`, VGG and MobileNetV2)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return net


def pool(x):
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def shuffle(x, groups: int):
    """ShuffleNet's channel shuffle: (groups, C / groups) channels read out transposed."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


# ---------------------------------------------------------------- ResNets (RepDistiller resnet.py, resnetv2.py)

class BasicBlock(nn.Module):
    """Two 3x3 conv + BN; the sum with the shortcut (projected where the shape changes) goes through a ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        changes = stride != 1 or c_in != c_out
        self.downsample = nn.Sequential(conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out)) if changes else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 down to `width`, 3x3, 1x1 up to 4 x width, each with BN; ReLU after the sum with the shortcut."""

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = 4 * width
        self.conv1, self.bn1 = conv1x1(c_in, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv1x1(width, c_out), nn.BatchNorm2d(c_out)
        changes = stride != 1 or c_in != c_out
        self.shortcut = nn.Sequential(conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out)) if changes else None

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """A 3x3 stem, then stages `layer1`, `layer2`, ... of blocks (the first of each from stage 2 on at stride 2),
    global average pooling and a linear classifier named `head` (resnet.py: fc, resnetv2.py: linear)."""

    hint_point = "layer2"   # feat[2]: the output of the second stage

    def __init__(self, block, widths, depths, num_classes: int, in_channels: int, head: str = "fc"):
        super().__init__()
        stem, *widths = widths
        self.conv1, self.bn1 = conv3x3(in_channels, stem), nn.BatchNorm2d(stem)
        c = stem
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(c, width, 2 if i > 0 and j == 0 else 1))
                c = width * (4 if block is Bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.stages = len(widths)
        self.head = head
        setattr(self, head, nn.Linear(c, num_classes))
        he_init(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return getattr(self, self.head)(pool(x))


def resnet(depth: int, widths, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """RepDistiller's CIFAR ResNet of depth 6n + 2: three stages of n basic blocks."""
    return ResNet(BasicBlock, widths, [(depth - 2) // 6] * 3, num_classes, in_channels)


resnet20 = network(partial(resnet, 20, (16, 16, 32, 64)), "resnet20")
resnet32 = network(partial(resnet, 32, (16, 16, 32, 64)), "resnet32")
resnet56 = network(partial(resnet, 56, (16, 16, 32, 64)), "resnet56")
resnet110 = network(partial(resnet, 110, (16, 16, 32, 64)), "resnet110")
resnet8x4 = network(partial(resnet, 8, (32, 64, 128, 256)), "resnet8x4")
resnet32x4 = network(partial(resnet, 32, (32, 64, 128, 256)), "resnet32x4")


@network
def ResNet50(num_classes: int = 100, in_channels: int = 3) -> ResNet:   # named as the benchmark names it
    """The benchmark's CIFAR ResNet50 (resnetv2.py): ImageNet's bottleneck stages on a 3x3 stride-1 stem."""
    return ResNet(Bottleneck, (64, 64, 128, 256, 512), (3, 4, 6, 3), num_classes, in_channels, head="linear")


# ---------------------------------------------------------------- wide ResNets (wrn.py)

class WideBlock(nn.Module):
    """Pre-activation: BN-ReLU-conv twice; where the width changes the shortcut is a 1x1 conv of the
    pre-activated input."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), conv3x3(c_in, c_out, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), conv3x3(c_out, c_out)
        self.convShortcut = conv1x1(c_in, c_out, stride) if c_in != c_out else None

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k: a 3x3 stem, stages `block1`..`block3` of (depth - 4) / 6 blocks at 16k, 32k, 64k channels,
    BN-ReLU, pooling, a linear classifier."""

    hint_point = "block2"   # feat[2]: the output of the second stage

    def __init__(self, depth: int, k: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = conv3x3(in_channels, 16)
        c = 16
        for i, width in enumerate((16 * k, 32 * k, 64 * k)):
            blocks = [WideBlock(c if j == 0 else width, width, 2 if i > 0 and j == 0 else 1) for j in range(n)]
            setattr(self, f"block{i + 1}", nn.Sequential(OrderedDict(layer=nn.Sequential(*blocks))))
            c = width
        self.bn1 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        he_init(self, linear="zero_bias")

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(pool(F.relu(self.bn1(x))))


wrn_16_2 = network(partial(WideResNet, 16, 2), "wrn_16_2")
wrn_40_1 = network(partial(WideResNet, 40, 1), "wrn_40_1")
wrn_40_2 = network(partial(WideResNet, 40, 2), "wrn_40_2")


# ---------------------------------------------------------------- VGG with batch norm (vgg.py)

class VGG(nn.Module):
    """Five blocks `block0`..`block4` of 3x3 conv-BN-ReLU, max-pooled between the first four; global average
    pooling and one linear classifier."""

    hint_point = "block2"   # feat[2]: the output of the third block

    def __init__(self, widths, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        c = in_channels
        for i, block in enumerate(widths):
            layers = []
            for width in block:
                layers += [conv3x3(c, width, bias=True), nn.BatchNorm2d(width), nn.ReLU()]
                c = width
            setattr(self, f"block{i}", nn.Sequential(*layers))
        self.blocks = len(widths)
        self.classifier = nn.Linear(c, num_classes)
        he_init(self, linear="normal")

    def forward(self, x):
        for i in range(self.blocks):
            x = getattr(self, f"block{i}")(x)
            if i < 3:
                x = F.max_pool2d(x, 2)
        return self.classifier(pool(x))


vgg8 = network(partial(VGG, [[64], [128], [256], [512], [512]]), "vgg8")
vgg13 = network(partial(VGG, [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]), "vgg13")


# ---------------------------------------------------------------- MobileNetV2, half width (mobilenetv2.py)

class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection, each with BN; a residual where shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.conv = nn.Sequential(*conv_bn_relu(conv1x1(c_in, mid)), *conv_bn_relu(conv3x3(mid, mid, stride, mid)),
                                  conv1x1(mid, c_out), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


@network
class MobileNetV2(nn.Module):
    """MobileNetV2 as the benchmark uses it: expansion 6, width 0.5, a stride-2 stem, seven stages `blocks.0`..
    `blocks.6`, a 1x1 conv to 1280 channels, pooling and a linear classifier."""

    hint_point = "blocks.2"   # feat[2]: the output of the third stage

    STAGES = [(16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]   # at width 1:
    # channels, blocks, the first block's stride; the first stage does not expand

    def __init__(self, num_classes: int = 100, in_channels: int = 3, expand: int = 6, width: float = 0.5):
        super().__init__()
        c = int(32 * width)
        self.conv1 = conv_bn_relu(conv3x3(in_channels, c, 2))
        self.blocks = nn.ModuleList()
        for k, (channels, n, stride) in enumerate(self.STAGES):
            out, t = int(channels * width), expand if k else 1
            self.blocks.append(nn.Sequential(*[InvertedResidual(c if i == 0 else out, out, stride if i == 0 else 1, t)
                                               for i in range(n)]))
            c = out
        self.conv2 = conv_bn_relu(conv1x1(c, 1280))
        self.classifier = nn.Sequential(nn.Linear(1280, num_classes))
        he_init(self, linear="normal")

    def forward(self, x):
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(pool(self.conv2(x)))



# ---------------------------------------------------------------- ShuffleNets (ShuffleNetv1.py, ShuffleNetv2.py)

class ShuffleUnit(nn.Module):
    """ShuffleNet V1: grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1, each with BN; at stride 2 the
    input, average-pooled, is concatenated to the output instead of added."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, groups_in: int):
        super().__init__()
        mid = c_out // 4
        self.groups = groups_in
        self.conv1, self.bn1 = conv1x1(c_in, mid, groups=groups_in), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = conv3x3(mid, mid, stride, groups=mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = conv1x1(mid, c_out, groups=groups), nn.BatchNorm2d(c_out)
        self.stride = stride

    def forward(self, x):
        out = shuffle(F.relu(self.bn1(self.conv1(x))), self.groups)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


@network
class ShuffleV1(nn.Module):
    """ShuffleNet V1 (the benchmark's name): a 1x1 stem to 24 channels, stages `layer1`..`layer3` of (4, 8, 4)
    units at (240, 480, 960) channels in 3 groups, each starting at stride 2 (the very first unit's 1x1 conv
    ungrouped); pooling and a linear classifier."""

    hint_point = "layer2"   # feat[2]: the output of the second stage

    def __init__(self, num_classes: int = 100, in_channels: int = 3, groups: int = 3):
        super().__init__()
        self.conv1, self.bn1 = conv1x1(in_channels, 24), nn.BatchNorm2d(24)
        c = 24
        for i, (width, n) in enumerate(zip((240, 480, 960), (4, 8, 4))):
            units = [ShuffleUnit(c, width - c, 2, groups, groups if i else 1)]
            units += [ShuffleUnit(width, width, 1, groups, groups) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
            c = width
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.linear(pool(self.layer3(self.layer2(self.layer1(x)))))


class SplitUnit(nn.Module):
    """ShuffleNet V2's unit: half the channels pass; the other half go through 1x1, 3x3 depthwise and 1x1
    (with BN); the halves are concatenated and shuffled."""

    def __init__(self, c: int):
        super().__init__()
        self.half = half = c // 2
        self.conv1, self.bn1 = conv1x1(half, half), nn.BatchNorm2d(half)
        self.conv2, self.bn2 = conv3x3(half, half, groups=half), nn.BatchNorm2d(half)
        self.conv3, self.bn3 = conv1x1(half, half), nn.BatchNorm2d(half)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x[:, self.half:])))))
        return shuffle(torch.cat([x[:, :self.half], F.relu(self.bn3(self.conv3(out)))], 1), 2)


class DownUnit(nn.Module):
    """ShuffleNet V2's stride-2 unit: two branches (3x3 depthwise then 1x1; 1x1, 3x3 depthwise, 1x1), each to
    half the output channels, concatenated and shuffled."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.conv1, self.bn1 = conv3x3(c_in, c_in, 2, groups=c_in), nn.BatchNorm2d(c_in)
        self.conv2, self.bn2 = conv1x1(c_in, mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = conv1x1(c_in, mid), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = conv3x3(mid, mid, 2, groups=mid), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = conv1x1(mid, mid), nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        return shuffle(torch.cat([left, F.relu(self.bn5(self.conv5(right)))], 1), 2)


@network
class ShuffleV2(nn.Module):
    """ShuffleNet V2 (the benchmark's name), width 1: a 1x1 stem to 24 channels, stages `layer1`..`layer3` (a
    stride-2 unit, then 3, 7, 3 units at 116, 232, 464 channels), a 1x1 conv to 1024 channels, pooling and a
    linear classifier."""

    hint_point = "layer2"   # feat[2]: the output of the second stage

    def __init__(self, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.conv1, self.bn1 = conv1x1(in_channels, 24), nn.BatchNorm2d(24)
        c = 24
        for i, (width, n) in enumerate(zip((116, 232, 464), (3, 7, 3))):
            setattr(self, f"layer{i + 1}", nn.Sequential(DownUnit(c, width), *[SplitUnit(width) for _ in range(n)]))
            c = width
        self.conv2, self.bn2 = conv1x1(c, 1024), nn.BatchNorm2d(1024)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(pool(F.relu(self.bn2(self.conv2(x)))))
