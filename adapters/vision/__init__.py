"""Vision towers we carry ourselves, registered with transformers' Auto classes so that a saved
tower loads through `AutoModel.from_pretrained(folder)` like any hub tower."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from adapters.vision.efficientnet_lite import (
    MODEL_TYPE,
    EfficientNetLiteConfig,
    EfficientNetLiteForImageClassification,
    EfficientNetLiteModel,
)

__all__ = ["EfficientNetLiteConfig", "EfficientNetLiteModel", "register_towers"]


def register_towers() -> None:
    """Idempotent: register our towers with the Auto classes."""
    try:
        AutoConfig.register(MODEL_TYPE, EfficientNetLiteConfig)
    except ValueError:
        return  # already registered
    AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel)
    AutoModelForImageClassification.register(
        EfficientNetLiteConfig, EfficientNetLiteForImageClassification
    )


register_towers()
