"""Built-in image-caption datasets that need no download: real digits and procedural shapes.

Both are indexed sources (see :mod:`clipjax.data.sources`): ``len(source)`` examples, each a
pure function of its index, with a FIXED held-out split that evaluators can rely on.

* :class:`DigitsSource` — scikit-learn's handwritten digits (1,797 real 8x8 grey scans, shipped
  with scikit-learn), upscaled to RGB uint8, captioned from varied templates ("a handwritten 7",
  "the digit seven", ...). Split: a fixed permutation, 20% held out.
* :class:`ShapesSource` — a coloured shape on a plain background, from colour x shape x position x
  size (+ jitter), rendered with numpy at any resolution; captions name every attribute, and the
  attributes are kept (``source.attributes``) for retrieval / search evaluation. Split: disjoint
  index ranges (train ``[0, n_train)``, test ``[n_train, n_train + n_test)``).
"""
from __future__ import annotations

import functools

import numpy as np

from clipjax.data.sources import Example, Source
from clipjax.evals.classnames import DIGIT_WORDS

# ---------------------------------------------------------------------------------------------
# digits

DIGIT_CAPTION_TEMPLATES = (
    "a photo of the number {word}.",
    "a handwritten {digit}",
    "the digit {word}",
    "a scan of a handwritten {word}",
    "the number {digit} written by hand",
    "a low resolution image of the digit {digit}",
    "{word}",
    "a blurry {word} on a white background",
    "handwriting: {digit}",
    "a pixelated picture of the number {word}",
    "the numeral {digit}, handwritten",
    "an image showing the number {word} ({digit})",
)

DIGITS_HELDOUT_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 20_231_017  # never change: the held-out split must stay fixed


@functools.lru_cache(maxsize=None)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int32)  # n 8 8 in [0, 16], n


def digits_split_indices(split: str) -> np.ndarray:
    """Indices into sklearn's digits for 'train' (80%), 'test' (20%) or 'all'; fixed forever."""
    _, labels = _load_digits()
    n = len(labels)
    perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(n)
    n_test = int(round(n * DIGITS_HELDOUT_FRACTION))
    if split == "train":
        return np.sort(perm[n_test:])
    if split in ("test", "heldout", "validation"):
        return np.sort(perm[:n_test])
    if split == "all":
        return np.arange(n)
    raise ValueError(f"digits split {split!r}: use 'train', 'test' or 'all'")


def digit_captions(label: int) -> list[str]:
    """Every caption template filled in for one digit label."""
    return [t.format(word=DIGIT_WORDS[label], digit=label) for t in DIGIT_CAPTION_TEMPLATES]


class DigitsSource(Source):
    """sklearn digits as dark ink on white paper, ``image_size`` px RGB uint8 (bicubic upscale)."""

    kind = "array"

    def __init__(self, split: str = "train", image_size: int = 32):
        if image_size < 8:
            raise ValueError(f"digits image_size={image_size}: use >= 8 (the scans are 8x8)")
        self.split, self.image_size = split, int(image_size)
        self.indices = digits_split_indices(split)
        images, labels = _load_digits()
        self.labels = labels[self.indices]
        self.images = _upscale_digits(images[self.indices], self.image_size)
        self.classnames = list(DIGIT_WORDS)
        self.name = "digits"

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, index: int) -> Example:
        label = int(self.labels[index])
        return Example(image=self.images[index], captions=digit_captions(label), label=label,
                       key=f"digits/{int(self.indices[index])}")


def _upscale_digits(images: np.ndarray, size: int) -> np.ndarray:
    """n 8 8 in [0, 16] (16 = ink) -> n size size 3 uint8, ink dark on white."""
    from PIL import Image
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, im in enumerate(images):
        grey = np.uint8(np.clip(255.0 - im * (255.0 / 16.0), 0, 255).round())
        big = np.asarray(Image.fromarray(grey, "L").resize((size, size), Image.BICUBIC))
        out[i] = big[..., None]
    return out


# ---------------------------------------------------------------------------------------------
# shapes

SHAPE_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245),
    "cyan": (40, 200, 210),
}
SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SHAPE_POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
                   "bottom left", "bottom middle", "bottom right")
SHAPE_SIZES = ("small", "large")
SHAPE_ATTRIBUTES = ("colour", "shape", "position", "size")

SHAPE_CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} in the {position}",
    "{a_colour} {shape}, {size}, at the {position}",
    "a picture of a {size} {colour} {shape} in the {position} of the image",
    "{colour} {shape} ({size}) {position}",
    "there is a {size} {colour} {shape} in the {position}",
    "a drawing of {a_colour} {shape} located at the {position}",
    "the {position} of the image has a {size} {colour} {shape}",
    "a simple {size} {colour} {shape} on a dark background, {position}",
    "one {colour} {shape} in the {position}",
    "{a_colour} {shape}",
)
_NUM_COMBOS = len(SHAPE_COLOURS) * len(SHAPE_NAMES) * len(SHAPE_POSITIONS) * len(SHAPE_SIZES)


def shape_attributes(index: int) -> dict[str, int]:
    """Attribute ids of example ``index``; every combination appears once per 864 indices."""
    # A fixed bijection on each block of combinations, so consecutive indices differ in all
    # attributes (a plain mixed-radix counter would keep colour constant for long runs).
    block, r = divmod(int(index), _NUM_COMBOS)
    code = (r * 395 + 17 * block) % _NUM_COMBOS  # 395 is coprime with 864
    code, colour = divmod(code, len(SHAPE_COLOURS))
    code, shape = divmod(code, len(SHAPE_NAMES))
    size, position = divmod(code, len(SHAPE_POSITIONS))
    return {"colour": colour, "shape": shape, "position": position, "size": size}


def shape_captions(attrs: dict[str, int]) -> list[str]:
    words = dict(colour=list(SHAPE_COLOURS)[attrs["colour"]], shape=SHAPE_NAMES[attrs["shape"]],
                 position=SHAPE_POSITIONS[attrs["position"]], size=SHAPE_SIZES[attrs["size"]])
    article = "an" if words["colour"][0] in "aeiou" else "a"
    return [t.format(a_colour=f"{article} {words['colour']}", **words) for t in SHAPE_CAPTION_TEMPLATES]


def render_shape(index: int, image_size: int = 64) -> np.ndarray:
    """Renders example ``index``: image_size image_size 3 uint8, deterministic in ``index``.

    Jitter (background shade, exact centre and radius, noise) comes from a generator seeded by
    the index only, so the same index is the same picture at a given resolution forever.
    """
    a = shape_attributes(index)
    rng = np.random.default_rng([0x5A9E5, int(index)])
    s = float(image_size)
    row, col = divmod(a["position"], 3)
    # radius + jitter < s / 6 (half a cell): a shape never leaves its cell or the image
    radius = (0.08 if a["size"] == 0 else 0.14) * s * rng.uniform(0.95, 1.05)
    cy = (row + 0.5) * s / 3 + rng.uniform(-0.015, 0.015) * s
    cx = (col + 0.5) * s / 3 + rng.uniform(-0.015, 0.015) * s
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    name = SHAPE_NAMES[a["shape"]]
    if name == "circle":
        mask = dx * dx + dy * dy <= 1.0
    elif name == "square":
        mask = (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    elif name == "triangle":  # apex up
        mask = (dy <= 0.8) & (dy >= -1.0 + 2.0 * np.abs(dx) * 0.95) & (dy >= -1.0)
    elif name == "diamond":
        mask = np.abs(dx) + np.abs(dy) <= 1.0
    elif name == "cross":
        mask = ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1.0))
    else:  # ring
        d2 = dx * dx + dy * dy
        mask = (d2 <= 1.0) & (d2 >= 0.45)
    background = rng.uniform(15, 60)
    img = np.full((image_size, image_size, 3), background, np.float32)
    colour = np.asarray(list(SHAPE_COLOURS.values())[a["colour"]], np.float32)
    img[mask] = colour * rng.uniform(0.9, 1.05)
    img += rng.normal(0.0, 4.0, img.shape).astype(np.float32)
    return np.uint8(np.clip(img, 0, 255).round())


class ShapesSource(Source):
    """Procedural shapes: ``image_size`` px RGB uint8, captions naming colour/shape/position/size.

    ``labels`` are shape ids (for zero-shot / linear probe over SHAPE_NAMES);
    ``attributes`` maps each of SHAPE_ATTRIBUTES to an int array over the split's examples.
    """

    kind = "array"

    def __init__(self, split: str = "train", image_size: int = 64, num_train: int = 8640,
                 num_test: int = 1728):
        if image_size < 12:
            raise ValueError(f"shapes image_size={image_size}: use >= 12 so shapes stay recognisable")
        if split == "train":
            self.offset, n = 0, num_train
        elif split in ("test", "heldout", "validation"):
            self.offset, n = num_train, num_test
        else:
            raise ValueError(f"shapes split {split!r}: use 'train' or 'test'")
        self.split, self.image_size, self.n = split, int(image_size), int(n)
        attrs = [shape_attributes(self.offset + i) for i in range(self.n)]
        self.attributes = {k: np.array([a[k] for a in attrs], np.int32) for k in SHAPE_ATTRIBUTES}
        self.labels = self.attributes["shape"]
        self.classnames = list(SHAPE_NAMES)
        self.name = "shapes"

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> Example:
        g = self.offset + int(index)
        attrs = {k: int(v[index]) for k, v in self.attributes.items()}
        return Example(image=render_shape(g, self.image_size), captions=shape_captions(attrs),
                       label=attrs["shape"], key=f"shapes/{g}")
