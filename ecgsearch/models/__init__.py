"""Model registry and the three architectures (ResNet-1d, ML-ResNet, U-ResNet).

Importing this package registers: resnet1d, resnet1d_tiny, mlresnet, mlresnet_tiny,
uresnet, uresnet_tiny.
"""
from .base import ECGModel, ModelConfig, Variant
from .registry import (REGISTRY, ModelRegistry, create_model, list_models, register_model,
                       sample_multiple)
# Importing the architecture modules registers their variants.
from .resnet1d import ResNet1d, ResNet1dConfig
from .mlresnet import MLResNet, MLResNetConfig
from .uresnet import UResNet, UResNetConfig

__all__ = [
    "ECGModel", "ModelConfig", "Variant", "REGISTRY", "ModelRegistry", "create_model",
    "list_models", "register_model", "sample_multiple", "ResNet1d", "ResNet1dConfig",
    "MLResNet", "MLResNetConfig", "UResNet", "UResNetConfig",
]
