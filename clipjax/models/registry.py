"""Model registry under open_clip's names (values checked against open_clip's model_configs JSON).

``-quickgelu`` variants are the same architecture with QuickGELU activations, which is what
OpenAI's released checkpoints were trained with; the plain names use exact GELU (open_clip's
default for models trained from scratch). ``tiny-vit`` / ``tiny-rn`` are small models for tests.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from clipjax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig

_TEXT_512 = TextConfig(width=512, heads=8, layers=12)
_TEXT_640 = TextConfig(width=640, heads=10, layers=12)
_TEXT_768 = TextConfig(width=768, heads=12, layers=12)
_TEXT_1024 = TextConfig(width=1024, heads=16, layers=12)

_BASE: dict[str, CLIPConfig] = {
    "RN50": CLIPConfig(1024, VisionConfig(224, (3, 4, 6, 3), 64, None), _TEXT_512),
    "RN101": CLIPConfig(512, VisionConfig(224, (3, 4, 23, 3), 64, None), _TEXT_512),
    "RN50x4": CLIPConfig(640, VisionConfig(288, (4, 6, 10, 6), 80, None), _TEXT_640),
    "RN50x16": CLIPConfig(768, VisionConfig(384, (6, 8, 18, 8), 96, None), _TEXT_768),
    "RN50x64": CLIPConfig(1024, VisionConfig(448, (3, 15, 36, 10), 128, None), _TEXT_1024),
    "ViT-B-32": CLIPConfig(512, VisionConfig(224, 12, 768, 32), _TEXT_512),
    "ViT-B-16": CLIPConfig(512, VisionConfig(224, 12, 768, 16), _TEXT_512),
    "ViT-L-14": CLIPConfig(768, VisionConfig(224, 24, 1024, 14), _TEXT_768),
    "ViT-L-14-336": CLIPConfig(768, VisionConfig(336, 24, 1024, 14), _TEXT_768),
}

MODEL_CONFIGS: dict[str, CLIPConfig] = {}
for _name, _cfg in _BASE.items():
    MODEL_CONFIGS[_name] = _cfg
    MODEL_CONFIGS[f"{_name}-quickgelu"] = dataclasses.replace(_cfg, quick_gelu=True)

_TINY_TEXT = TextConfig(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
MODEL_CONFIGS["tiny-vit"] = CLIPConfig(32, VisionConfig(32, 2, 64, 8, head_width=16), _TINY_TEXT)
# 64 px so that the attention pool sees a 2x2 grid (image_size // 32).
MODEL_CONFIGS["tiny-rn"] = CLIPConfig(32, VisionConfig(64, (1, 1, 1, 1), 8, None, head_width=32), _TINY_TEXT)

_MODULE_FIELDS = ("dtype", "param_dtype", "scan", "remat_policy", "precision")


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` / :func:`get_model_config`."""
    return sorted(MODEL_CONFIGS)


def get_model_config(name: str, **overrides: Any) -> CLIPConfig:
    """The :class:`CLIPConfig` of ``name``, with optional overrides.

    Overrides: any ``CLIPConfig`` field (``embed_dim=256``, ``quick_gelu=True``), a vision/text
    field with a ``vision_``/``text_`` prefix (``vision_image_size=336``, ``text_layers=6``), or a
    whole ``vision=VisionConfig(...)`` / ``text=TextConfig(...)``.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(list_models())}.")
    cfg = MODEL_CONFIGS[name]
    top, vis, txt = {}, {}, {}
    v_fields = {f.name for f in dataclasses.fields(VisionConfig)}
    t_fields = {f.name for f in dataclasses.fields(TextConfig)}
    c_fields = {f.name for f in dataclasses.fields(CLIPConfig)}
    for key, value in overrides.items():
        if key in c_fields:
            top[key] = value
        elif key.startswith("vision_") and key[7:] in v_fields:
            vis[key[7:]] = tuple(value) if isinstance(value, list) else value
        elif key.startswith("text_") and key[5:] in t_fields:
            txt[key[5:]] = value
        else:
            raise ValueError(f"Unknown override {key!r} for model {name!r}. Use a CLIPConfig field "
                             f"{sorted(c_fields)}, 'vision_' + one of {sorted(v_fields)}, or 'text_' + one of "
                             f"{sorted(t_fields)}.")
    cfg = dataclasses.replace(cfg, **top)
    if vis:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vis))
    if txt:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **txt))
    return cfg.validate()


def create_model(name: str, **overrides: Any) -> CLIP:
    """A :class:`CLIP` module for ``name``.

    ``overrides``: module fields (``dtype``, ``param_dtype``, ``scan``, ``remat_policy``,
    ``precision``) and any config override accepted by :func:`get_model_config`.
    """
    module_kwargs = {k: overrides.pop(k) for k in _MODULE_FIELDS if k in overrides}
    return CLIP(get_model_config(name, **overrides), **module_kwargs)
