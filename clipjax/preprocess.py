"""CLIP image preprocessing: the reference eval transform (PIL/numpy and tf.data) and the
random-resized-crop used for training.

Eval (OpenAI CLIP / open_clip ``image_transform(size, is_train=False)``)::

    bicubic resize, short side → image_size (long side = int(size * long / short))
    → center crop image_size² (offsets rounded half-to-even, as Python's round)
    → RGB → [0, 1] → (x - CLIP_MEAN) / CLIP_STD          → h w c float32

The PIL path runs these steps in the reference's order and with the same PIL calls, so it
matches open_clip to float rounding, including its treatment of odd modes: the resize happens
in the image's own mode (RGBA resamples with premultiplied alpha, palette and 1-bit images
resample with nearest neighbour, as PIL does), and only then is the crop converted to RGB
(alpha dropped, CMYK by PIL's formula). The one deliberate difference: 16-bit images (PIL
modes ``I;16*``, uint16 arrays) are scaled to 8 bits (÷257) first; the reference saturates
every value above 255 to white. (32-bit ``I`` and ``F`` modes are left to PIL, as in the
reference.)

The tf.data path (``tf_preprocess_eval``) reproduces PIL's resize with
``tf.image.resize(bicubic, antialias=True)`` (the same Keys cubic, a = -0.5, with the same
support widening) run as PIL runs it: horizontal pass, round to uint8, vertical pass, round.
It matches the PIL path on almost every pixel; the rest differ by one grey level (float vs
PIL's fixed-point weights; the tests state the bound). Output sizes, crop offsets and
normalisation are identical.

Training (``tf_random_resized_crop``) follows torchvision's RandomResizedCrop (10 tries of a
uniform area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, else a
centre crop clamped to ``ratio``) with stateless TF random ops: the crop is a pure function of
the ``seed`` tensor, so a data pipeline that derives the seed from (seed, step, index) is
deterministic and resumable.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "preprocess_image", "preprocess_images", "preprocess_batch",
           "to_rgb_uint8", "resized_short_side", "tf_preprocess_eval", "tf_random_resized_crop",
           "tf_random_resized_crop_box"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[Image.Image, np.ndarray]
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _check_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels per side of the square "
                         f"output, e.g. 224), got {image_size!r}.")
    return int(image_size)


def resized_short_side(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(new_height, new_width) after resizing the short side to ``image_size``.

    The long side is ``int(image_size * long / short)`` (truncated), as torchvision's Resize.
    """
    if width <= height:
        return int(image_size * height / width), image_size
    return image_size, int(image_size * width / height)


def _center_crop_offsets(height: int, width: int, image_size: int) -> tuple[int, int]:
    # Python's round() (half to even), as torchvision's CenterCrop.
    return int(round((height - image_size) / 2.0)), int(round((width - image_size) / 2.0))


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """uint8/uint16/bool/float-in-[0,1] arrays (h w, h w 1, h w 3, h w 4) → PIL image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an image array of shape (h, w), (h, w, 1), (h, w, 3) or "
                         f"(h, w, 4) (channels last), got shape {array.shape}. For a batch, use "
                         f"preprocess_images; for channels-first data, transpose to h w c.")
    if min(array.shape[:2]) < 1:
        raise ValueError(f"image has an empty side: shape {array.shape}.")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = _sixteen_to_eight(array)
    elif np.issubdtype(array.dtype, np.floating):
        lo, hi = float(np.min(array)), float(np.max(array))
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"float images must hold values in [0, 1], got range [{lo}, {hi}]. "
                             "Divide 0-255 data by 255, or pass it as uint8.")
        array = np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {array.dtype}: pass uint8 (0-255), uint16 "
                         "(0-65535), bool, or float in [0, 1].")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
    image = Image.fromarray(np.ascontiguousarray(array))
    assert image.mode == mode, (image.mode, mode)
    return image


def _as_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        if min(image.size) < 1:
            raise ValueError(f"image has an empty side: size {image.size}.")
        if image.mode in _SIXTEEN_BIT_MODES:
            return Image.fromarray(_sixteen_to_eight(np.asarray(image)))
        return image
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        return _array_to_pil(np.asarray(image))
    raise TypeError(f"expected a PIL.Image.Image or a numpy array, got {type(image).__name__}.")


def preprocess_image(image: ImageLike, image_size: int = 224, mean=CLIP_MEAN,
                     std=CLIP_STD) -> np.ndarray:
    """The CLIP eval transform of one image.

    Args:
      image: PIL image (any mode) or array ``h w``/``h w c`` (c in 1, 3, 4) of uint8,
        uint16, bool or float in [0, 1].
      image_size: side of the square output.
      mean, std: per-channel normalisation (defaults: CLIP's).

    Returns:
      image: h w c float32 with h = w = image_size, c = 3.
    """
    size = _check_size(image_size)
    pil = _as_pil(image)
    width, height = pil.size
    new_h, new_w = resized_short_side(height, width, size)
    if (new_h, new_w) != (height, width):
        pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = _center_crop_offsets(new_h, new_w, size)
    pil = pil.crop((left, top, left + size, top + size))
    rgb = np.asarray(pil.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    return ((rgb - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def preprocess_images(images: Sequence[ImageLike], image_size: int = 224, mean=CLIP_MEAN,
                      std=CLIP_STD) -> np.ndarray:
    """The CLIP eval transform of several images: ``b h w c`` float32."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if isinstance(images, (Image.Image, np.ndarray)) or not isinstance(images, Sequence):
        raise TypeError("preprocess_images takes a sequence of images (or a b h w c array); "
                        "for one image use preprocess_image.")
    size = _check_size(image_size)
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, image in enumerate(images):
        out[i] = preprocess_image(image, size, mean, std)
    return out


preprocess_batch = preprocess_images


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Any supported image → h w 3 uint8 RGB (e.g. to feed the tf.data path)."""
    return np.asarray(_as_pil(image).convert("RGB"))


# --------------------------------------------------------------------------------------------
# tf.data
# --------------------------------------------------------------------------------------------

def _tf_float_rgb(image, name: str):
    """h w c image tensor (uint8, uint16 or float in [0, 1]; c in 1, 3, 4) → h w 3 float32
    in [0, 255]. Alpha is dropped (as the reference's final RGB conversion does)."""
    import tensorflow as tf
    image = tf.convert_to_tensor(image)
    if image.shape.rank is not None and image.shape.rank != 3:
        raise ValueError(f"{name} expects one image of shape (h, w, c), got shape {image.shape}; "
                         f"map it over a batch with tf.map_fn or Dataset.map.")
    channels = image.shape[-1] if image.shape.rank is not None else None
    if channels is None:
        raise ValueError(f"{name} needs a known channel count; use "
                         f"tf.io.decode_image(..., channels=3) or image.set_shape([None, None, 3]).")
    if channels not in (1, 3, 4):
        raise ValueError(f"{name} expects 1, 3 or 4 channels, got {channels}.")
    if image.dtype == tf.uint8:
        image = tf.cast(image, tf.float32)
    elif image.dtype == tf.uint16:
        image = tf.cast(image, tf.float32) / 257.0
    elif image.dtype.is_floating:
        image = tf.cast(image, tf.float32) * 255.0
    else:
        raise ValueError(f"{name} expects uint8, uint16 or float (in [0, 1]) images, got "
                         f"{image.dtype.name}.")
    if channels == 1:
        image = tf.tile(image, [1, 1, 3])
    elif channels == 4:
        image = image[..., :3]
    return image


def _tf_resize(image, height, width):
    """PIL's 8-bit bicubic resize, in TF ops.

    Same kernel (Keys cubic, a = -0.5, support widened by the downscale factor) and the same
    separable order as PIL: the horizontal pass, then the vertical one, each result rounded
    half up and clipped to 0..255 as PIL stores it in uint8. Doing it in one float pass
    instead differs from PIL by up to ~10 grey levels at high-contrast edges.
    """
    import tensorflow as tf

    def to_uint8_grid(x):
        return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)

    rows = tf.shape(image)[0]
    image = to_uint8_grid(tf.image.resize(image, tf.stack([rows, width]), method="bicubic",
                                          antialias=True))
    return to_uint8_grid(tf.image.resize(image, tf.stack([height, width]), method="bicubic",
                                         antialias=True))


def _tf_normalize(image, mean, std):
    import tensorflow as tf
    return (image / 255.0 - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def tf_preprocess_eval(image, image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD):
    """The CLIP eval transform as TF ops (for ``Dataset.map``).

    Args:
      image: h w c tensor, uint8 (or uint16, or float in [0, 1]); c in 1, 3, 4.
      image_size: side of the square output.

    Returns:
      image: h w c float32, h = w = image_size, c = 3, CLIP-normalised.
    """
    import tensorflow as tf
    size = _check_size(image_size)
    image = _tf_float_rgb(image, "tf_preprocess_eval")
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    # int(size * long / short) in float64, exactly as Python computes it.
    new_long = tf.cast(tf.math.floor(tf.cast(size * long, tf.float64) /
                                     tf.cast(short, tf.float64)), tf.int32)
    new_h = tf.where(width <= height, new_long, size)
    new_w = tf.where(width <= height, size, new_long)
    same = tf.logical_and(tf.equal(new_h, height), tf.equal(new_w, width))
    image = tf.cond(same, lambda: image, lambda: _tf_resize(image, new_h, new_w))
    # round() half to even, like Python's: tf.round rounds half to even too.
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2.0), tf.int32)
    image = tf.slice(image, tf.stack([top, left, 0]), [size, size, 3])
    return tf.ensure_shape(_tf_normalize(image, mean, std), [size, size, 3])


def tf_random_resized_crop_box(height, width, seed, scale=(0.9, 1.0),
                               ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """torchvision's RandomResizedCrop box with stateless randomness: (top, left, h, w) int32.

    Ten candidates are drawn at once (area fraction ~ U(scale), log aspect ~ U(log ratio));
    the first that fits is used, else a centre crop with the aspect clamped to ``ratio``.
    """
    import tensorflow as tf
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got "
                         f"scale={scale}, ratio={ratio}.")
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank is not None and seed.shape.as_list() != [2]:
        raise ValueError(f"seed must be a shape-[2] integer tensor (e.g. [global_seed, "
                         f"example_index]), got shape {seed.shape}.")
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    tries = 10
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    target = h * w * tf.random.stateless_uniform([tries], seeds[0], scale[0], scale[1],
                                                 dtype=tf.float64)
    aspect = tf.exp(tf.random.stateless_uniform([tries], seeds[1], math.log(ratio[0]),
                                                math.log(ratio[1]), dtype=tf.float64))
    cw = tf.round(tf.sqrt(target * aspect))   # round half to even, like Python's round
    ch = tf.round(tf.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    ch_pick, cw_pick = ch[first], cw[first]
    u = tf.random.stateless_uniform([2], seeds[2], dtype=tf.float64)
    top_fit = tf.floor(u[0] * (h - ch_pick + 1.0))
    left_fit = tf.floor(u[1] * (w - cw_pick + 1.0))
    # Fallback: centre crop, aspect clamped to the ratio range.
    in_ratio = w / h
    cw_fb = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    ch_fb = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    top_fb = tf.floor((h - ch_fb) / 2.0)
    left_fb = tf.floor((w - cw_fb) / 2.0)
    box = tf.where(tf.reduce_any(fits), tf.stack([top_fit, left_fit, ch_pick, cw_pick]),
                   tf.stack([top_fb, left_fb, ch_fb, cw_fb]))
    return tf.unstack(tf.cast(box, tf.int32))


def tf_random_resized_crop(image, image_size: int = 224, scale=(0.9, 1.0), seed=None,
                           ratio=(3.0 / 4.0, 4.0 / 3.0), mean=CLIP_MEAN, std=CLIP_STD):
    """Training crop: random box (torchvision's RandomResizedCrop), bicubic resize to
    image_size², CLIP normalisation. Deterministic in ``seed``.

    Args:
      image: h w c tensor, uint8 (or uint16, or float in [0, 1]); c in 1, 3, 4.
      image_size: side of the square output.
      scale: range of the crop's area as a fraction of the image (open_clip: (0.9, 1.0)).
      seed: shape-[2] integer tensor, e.g. ``[config.seed, example_index]`` or the output of
        ``tf.random.experimental.stateless_fold_in``; required (no hidden global state).
      ratio: range of the crop's aspect ratio (w / h).

    Returns:
      image: h w c float32, h = w = image_size, c = 3.
    """
    import tensorflow as tf
    size = _check_size(image_size)
    if seed is None:
        raise ValueError("tf_random_resized_crop needs seed=[a, b] (a shape-[2] integer tensor) "
                         "so that crops are reproducible; derive it from (seed, step, index).")
    image = _tf_float_rgb(image, "tf_random_resized_crop")
    shape = tf.shape(image)
    top, left, ch, cw = tf_random_resized_crop_box(shape[0], shape[1], seed, scale, ratio)
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([ch, cw, 3]))
    return tf.ensure_shape(_tf_normalize(_tf_resize(crop, size, size), mean, std),
                           [size, size, 3])
