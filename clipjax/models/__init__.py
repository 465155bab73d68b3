"""CLIP models in flax.linen: ViT and ModifiedResNet image towers, text tower, registry."""
from clipjax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, clip_logits
from clipjax.models.layers import (MLP, Attention, LayerNorm, ResidualBlock, Transformer, make_causal_mask,
                                   stack_layers, unstack_layers)
from clipjax.models.registry import MODEL_CONFIGS, create_model, get_model_config, list_models
from clipjax.models.resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from clipjax.models.text import TextTransformer
from clipjax.models.vit import VisionTransformer

__all__ = [
    "Attention", "AttentionPool2d", "Bottleneck", "CLIP", "CLIPConfig", "LayerNorm", "MLP", "MODEL_CONFIGS",
    "ModifiedResNet", "ResidualBlock", "TextConfig", "TextTransformer", "Transformer", "VisionConfig",
    "VisionTransformer", "clip_logits", "create_model", "get_model_config", "list_models", "make_causal_mask",
    "stack_layers", "unstack_layers",
]
