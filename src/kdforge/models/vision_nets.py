"""The CIFAR networks of the knowledge-distillation benchmarks (CRD, Tian et al., ICLR 2020).

Written from the papers' architecture descriptions:

* **CIFAR ResNets** (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2):
  a 3x3 conv stem, then three stages of ``n`` BasicBlocks on 32x32, 16x16 and 8x8 maps (the first
  block of stages 2 and 3 has stride 2), global average pooling and a linear classifier; depth =
  6n + 2. ``resnet8/14/20/32/44/56/110`` use stage widths (16, 32, 64) after a 16-channel stem. The
  ``x4`` variants of CRD (``resnet8x4``: n = 1, ``resnet32x4``: n = 5) use widths (64, 128, 256) after
  a 32-channel stem. Where a block changes the shape, the shortcut is a 1x1 conv + BN projection
  (the paper's option B, as in the CRD benchmarks).
* **Wide ResNets** (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016): a 3x3 conv stem with
  16 channels, then three stages of ``n`` pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) of
  widths 16k, 32k, 64k (strides 1, 2, 2), a final BN-ReLU, global average pooling and a linear
  classifier; depth = 6n + 4 and ``wrn_D_k`` = depth D, widening factor k. No dropout.
* **small_cnn**: a plain CNN with the same stages (one conv-BN-ReLU each), for tests and 8x8 digits.
* **Parametric CIFAR ResNets** ``resnet{D}_w{W}`` (not registered, parsed from the name, so a searched
  student is a plain config value): depth D = 6n + 2, stage widths (W, 2W, 4W) after a W-channel stem;
  ``resnet20_w16`` is ``resnet20``.

Every net takes ``num_classes`` and ``in_channels`` and returns logits from ``forward(x)``. Features
are read elsewhere with forward hooks by module path, so the submodules have stable names: ``stem``,
``layer1``, ``layer2``, ``layer3`` (stage outputs), ``post_act`` (the final BN-ReLU of WRNs, the
identity elsewhere), ``pool`` (``(N, C, 1, 1)``) and ``fc``. No activation is in-place, so a
tensor captured by a hook is never modified afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.registry import Registry

VISION_NETS: Registry[Callable[..., nn.Module]] = Registry("vision net")
"""Net name -> factory called as ``factory(num_classes=..., in_channels=...)``."""


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), nn.ReLU())


def _stage(block: Callable[[int, int, int], nn.Module], in_channels: int, out_channels: int,
           blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` residual blocks; the first changes the width and applies ``stride``."""
    layers = [block(in_channels, out_channels, stride)]
    layers += [block(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan-out), BatchNorm weight 1 / bias 0, zero linear biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


def _blocks_per_stage(depth: int, layers_outside: int, what: str) -> int:
    if depth < layers_outside + 6 or (depth - layers_outside) % 6:
        raise ValueError(f"{what} depth must be 6n + {layers_outside} with n >= 1, got {depth}")
    return (depth - layers_outside) // 6


class _Classifier(nn.Module):
    """Shared forward: ``stem`` -> ``layer1..3`` -> ``post_act`` -> ``pool`` -> ``fc``."""

    post_act: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(self.post_act(x)), 1))


class BasicBlock(nn.Module):
    """He et al. (2016) post-activation block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 conv + BN projection when stride or width changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(_Classifier):
    """CIFAR ResNet of depth 6n + 2 (He et al., 2016, sec. 4.2), optionally widened as in CRD."""

    def __init__(self, depth: int, channels: tuple[int, int, int] = (16, 32, 64), stem_channels: int = 16,
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        blocks = _blocks_per_stage(depth, 2, "CIFAR ResNet")
        self.stem = conv_bn_relu(in_channels, stem_channels)
        self.layer1 = _stage(BasicBlock, stem_channels, channels[0], blocks, stride=1)
        self.layer2 = _stage(BasicBlock, channels[0], channels[1], blocks, stride=2)
        self.layer3 = _stage(BasicBlock, channels[1], channels[2], blocks, stride=2)
        self.post_act = nn.Identity()  # blocks already end with a ReLU
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[2], num_classes)
        init_weights(self)


class PreActBlock(nn.Module):
    """Wide-ResNet block (pre-activation, He et al., ECCV 2016): ``conv(relu(bn(conv(relu(bn(x)))))) + s``.

    ``s`` is ``x``, or a 1x1 conv of the pre-activated input ``relu(bn(x))`` when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(_Classifier):
    """WRN-depth-k (Zagoruyko & Komodakis, 2016): depth 6n + 4, stage widths 16k, 32k, 64k."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        blocks = _blocks_per_stage(depth, 4, "Wide ResNet")
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = conv3x3(in_channels, 16)
        self.layer1 = _stage(PreActBlock, 16, widths[0], blocks, stride=1)
        self.layer2 = _stage(PreActBlock, widths[0], widths[1], blocks, stride=2)
        self.layer3 = _stage(PreActBlock, widths[1], widths[2], blocks, stride=2)
        self.post_act = nn.Sequential(nn.BatchNorm2d(widths[2]), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        init_weights(self)


class SmallCNN(_Classifier):
    """A plain (non-residual) CNN shaped like a CIFAR ResNet: a 16-channel conv-BN-ReLU stem, then one
    conv-BN-ReLU per stage (16, 32, 64 channels; strides 1, 2, 2), global average pooling and a linear
    layer. ~26k parameters (10 classes); any input size (8x8 digits included)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, 16)
        self.layer1 = conv_bn_relu(16, 16)
        self.layer2 = conv_bn_relu(16, 32, stride=2)
        self.layer3 = conv_bn_relu(32, 64, stride=2)
        self.post_act = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)


_CIFAR_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56,
                 "resnet110": 110}
for _name, _depth in _CIFAR_DEPTHS.items():
    VISION_NETS.register(_name)(partial(CifarResNet, _depth))
for _name, _depth in {"resnet8x4": 8, "resnet32x4": 32}.items():
    VISION_NETS.register(_name)(partial(CifarResNet, _depth, channels=(64, 128, 256), stem_channels=32))
for _name, (_depth, _k) in {"wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}.items():
    VISION_NETS.register(_name)(partial(WideResNet, _depth, _k))
VISION_NETS.register("small_cnn")(SmallCNN)


#: ``resnet{depth}_w{width}``: a CIFAR ResNet of that depth with stage widths (w, 2w, 4w) after a w-channel stem
PARAMETRIC_RESNET = re.compile(r"^resnet(\d+)_w(\d+)$")


def parametric_resnet(name: str, config_key: str = "model") -> Callable[..., nn.Module] | None:
    """The factory of a ``resnet{D}_w{W}`` name (None for other names); a depth not of the form 6n + 2
    or a zero width is a one-line KDForgeError naming ``config_key``."""
    match = PARAMETRIC_RESNET.match(name)
    if match is None:
        return None
    depth, width = int(match.group(1)), int(match.group(2))
    if depth < 8 or (depth - 2) % 6 or width < 1:
        raise KDForgeError(f"vision net {name!r} (config key `{config_key}`): resnet{{D}}_w{{W}} needs a depth "
                           "D = 6n + 2 (8, 14, 20, ...) and a width W >= 1, e.g. resnet14_w32")
    return partial(CifarResNet, depth, channels=(width, 2 * width, 4 * width), stem_channels=width)


def build_vision_net(name: str, num_classes: int, in_channels: int = 3, *,
                     config_key: str = "model") -> nn.Module:
    """A freshly initialised net registered as ``name`` or named ``resnet{D}_w{W}``; an unknown name is a
    one-line KDForgeError naming ``config_key`` and the known nets."""
    factory = parametric_resnet(name, config_key)
    if factory is None:
        try:
            factory = VISION_NETS.get(name, config_key)
        except KDForgeError as err:
            raise KDForgeError(f"{err}, or resnet{{D}}_w{{W}} (depth 6n + 2, width W; e.g. resnet14_w32)") from None
    return factory(num_classes=num_classes, in_channels=in_channels)
