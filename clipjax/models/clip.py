"""The CLIP model: an image tower (ViT or ModifiedResNet), a text tower and a learned logit scale.

Configs are frozen dataclasses (hashable, so they can be flax module fields); field names follow
open_clip's ``model_configs/*.json`` (``embed_dim``, ``vision_cfg``/``text_cfg`` -> ``vision``/``text``).

Usage::

    model = CLIP(config)                       # or clipjax.models.create_model("ViT-B-32")
    variables = model.init(rng, images, tokens)   # images: b h w 3 (normalised), tokens: b l
    img = model.apply(variables, images, normalize=True, method=CLIP.encode_image)
    out = model.apply(variables, images, tokens)  # {'image_features', 'text_features', 'logit_scale'}
    logits = clip_logits(out)                     # b_img b_txt
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.resnet import ModifiedResNet
from clipjax.models.text import TextTransformer
from clipjax.models.vit import VisionTransformer

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Image tower. ``patch_size=None`` and a 4-tuple ``layers`` select the ModifiedResNet."""
    image_size: int = 224
    layers: Union[int, Tuple[int, int, int, int]] = 12
    width: int = 768
    patch_size: Optional[int] = 32
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_dropout: float = 0.0  # FLIP: fraction of patches dropped in training; keep ratio = 1 - this

    @property
    def is_resnet(self) -> bool:
        return self.patch_size is None

    @property
    def heads(self) -> int:
        # open_clip: ViT heads = width / head_width; RN attention pool heads = 32 * width / head_width.
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclasses.dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    quick_gelu: bool = False  # OpenAI's released weights were trained with QuickGELU
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: Optional[float] = None  # set (e.g. -10.0) for a SigLIP-style logit bias

    def validate(self) -> "CLIPConfig":
        v, t = self.vision, self.text
        if v.is_resnet:
            if not isinstance(v.layers, (tuple, list)) or len(v.layers) != 4:
                raise ValueError(f"vision.patch_size=None selects ModifiedResNet, which needs vision.layers "
                                 f"as 4 stage depths; got {v.layers!r}.")
            if v.image_size % 32:
                raise ValueError(f"ModifiedResNet needs vision.image_size divisible by 32, got {v.image_size}.")
        else:
            if not isinstance(v.layers, int):
                raise ValueError(f"A ViT needs an int vision.layers, got {v.layers!r} (a 4-tuple with "
                                 "patch_size=None selects ModifiedResNet).")
            if v.image_size % v.patch_size:
                raise ValueError(f"vision.image_size={v.image_size} is not divisible by "
                                 f"vision.patch_size={v.patch_size}.")
            if v.width % v.head_width:
                raise ValueError(f"vision.width={v.width} is not divisible by head_width={v.head_width}.")
            if not 0.0 <= v.patch_dropout < 1.0:
                raise ValueError(f"vision.patch_dropout must be in [0, 1), got {v.patch_dropout}.")
        if t.width % t.heads:
            raise ValueError(f"text.width={t.width} is not divisible by text.heads={t.heads}.")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        d = dict(d)
        vision = dict(d.pop("vision", None) or d.pop("vision_cfg", None) or {})
        text = dict(d.pop("text", None) or d.pop("text_cfg", None) or {})
        if isinstance(vision.get("layers"), list):
            vision["layers"] = tuple(vision["layers"])
        known_v = {f.name for f in dataclasses.fields(VisionConfig)}
        known_t = {f.name for f in dataclasses.fields(TextConfig)}
        return cls(vision=VisionConfig(**{k: v for k, v in vision.items() if k in known_v}),
                   text=TextConfig(**{k: v for k, v in text.items() if k in known_t}), **d).validate()


class CLIP(nn.Module):
    """Contrastive image/text model. Images are NHWC and already normalised (CLIP mean/std)."""
    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat_policy: str = "none"
    precision: Any = None

    def setup(self):
        cfg = self.config.validate()
        v, t = cfg.vision, cfg.text
        act = "quick_gelu" if cfg.quick_gelu else "gelu"
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        if v.is_resnet:
            self.visual = ModifiedResNet(v.image_size, tuple(v.layers), v.width, v.heads, cfg.embed_dim, **common)
        else:
            self.visual = VisionTransformer(
                v.image_size, v.patch_size, v.width, v.layers, v.heads, cfg.embed_dim, mlp_ratio=v.mlp_ratio,
                activation=act, patch_dropout=v.patch_dropout, scan=self.scan, remat_policy=self.remat_policy,
                **common)
        self.text = TextTransformer(
            t.context_length, t.vocab_size, t.width, t.layers, t.heads, cfg.embed_dim, mlp_ratio=t.mlp_ratio,
            activation=act, scan=self.scan, remat_policy=self.remat_policy, **common)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.init_logit_scale), ()), (), jnp.float32)
        if cfg.init_logit_bias is not None:
            self.logit_bias = self.param("logit_bias", nn.with_logical_partitioning(
                nn.initializers.constant(cfg.init_logit_bias), ()), (), jnp.float32)

    @staticmethod
    def _finish(x, normalize):
        x = x.astype(jnp.float32)
        if normalize:
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x

    def encode_image(self, images: jax.Array, normalize: bool = False, train: bool = False) -> jax.Array:
        """``images: b h w c -> b embed_dim`` (float32)."""
        return self._finish(self.visual(images, train=train), normalize)

    def encode_text(self, tokens: jax.Array, normalize: bool = False, train: bool = False) -> jax.Array:
        """``tokens: b l -> b embed_dim`` (float32)."""
        return self._finish(self.text(tokens, train=train), normalize)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> dict:
        """Returns normalised ``image_features: b e``, ``text_features: b e`` and, as open_clip does,
        ``logit_scale`` already exponentiated (the param stores its log), plus ``logit_bias`` when
        configured: logits are ``logit_scale * img @ txt.T [+ logit_bias]``."""
        out = {
            "image_features": self.encode_image(images, normalize=True, train=train),
            "text_features": self.encode_text(tokens, normalize=True, train=train),
            "logit_scale": jnp.exp(self.logit_scale),
        }
        if self.config.init_logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def clip_logits(outputs: dict) -> jax.Array:
    """Image->text logits ``b_img b_txt`` from the dict returned by ``CLIP.__call__``."""
    logits = outputs["logit_scale"] * outputs["image_features"] @ outputs["text_features"].T
    if "logit_bias" in outputs:
        logits = logits + outputs["logit_bias"]
    return logits
