"""Class names and prompt templates for zero-shot evaluation, kept as plain data.

``TEMPLATES[name]`` are ``str.format`` patterns with one ``{}`` for the class name;
``prompts(name)`` expands them. The CIFAR templates and the 80 ImageNet templates are the
ones published with OpenAI CLIP (see THIRD_PARTY.md); the digits and shapes entries are ours
and match the captions of the built-in datasets (clipjax.data.builtin).
"""
from __future__ import annotations

import os

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CLASSNAMES: dict[str, tuple[str, ...]] = {
    "digits": DIGIT_WORDS,
    "shapes": ("circle", "square", "triangle", "diamond", "cross", "ring"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
    # The tfds/torchvision label names with '_' written as a space, as in CLIP's prompts.md.
    "cifar100": (
        "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
        "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
        "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
        "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
        "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
        "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom",
        "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
        "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
        "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
        "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank",
        "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
        "wardrobe", "whale", "willow tree", "wolf", "woman", "worm"),
}


def _read_names(filename: str) -> tuple[str, ...]:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), filename), encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f if line.strip())


# OpenAI CLIP's 1,000 hand-edited ImageNet class names (the zero-shot notebook's list), in the
# order of the synset ids (the label order of tfds imagenet2012 and the datasets that share its
# classes). One name per line in imagenet_classnames.txt; see THIRD_PARTY.md.
IMAGENET_CLASSNAMES = _read_names("imagenet_classnames.txt")
# Datasets labelled with ImageNet-1k's classes in the same order (tfds names).
IMAGENET_1K_DATASETS = ("imagenet", "imagenet2012", "imagenet2012_real", "imagenet_v2", "imagenet_sketch",
                        "imagenet2012_corrupted")
CLASSNAMES.update({name: IMAGENET_CLASSNAMES for name in IMAGENET_1K_DATASETS})

# OpenAI CLIP's 18 templates for CIFAR-10 and CIFAR-100 (data/prompts.md).
CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)

# OpenAI CLIP's 80 ImageNet templates (notebooks/Prompt_Engineering_for_ImageNet.ipynb), in order.
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)

# Ours. Digit prompts use the number word; the built-in digits captions add numerals and
# other phrasings (clipjax.data.builtin.DIGIT_CAPTION_TEMPLATES).
DIGIT_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "a blurry photo of the number {}.",
    "a drawing of the number {}.",
)

SHAPE_TEMPLATES = (
    "a {}.",
    "a photo of a {}.",
    "a drawing of a {}.",
    "a simple {} shape.",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "digits": DIGIT_TEMPLATES,
    "shapes": SHAPE_TEMPLATES,
    "cifar10": CIFAR_TEMPLATES,
    "cifar100": CIFAR_TEMPLATES,
    **{name: IMAGENET_TEMPLATES for name in IMAGENET_1K_DATASETS},
}


def dataset_base(name: str) -> str:
    """'imagenet2012:5.1.0' / 'cifar100/coarse' -> 'imagenet2012' / 'cifar100' (the TEMPLATES key)."""
    return name.split(":")[0].split("/")[0]


def templates_for(dataset: str, default: tuple[str, ...] = CIFAR_TEMPLATES) -> tuple[str, ...]:
    """The zero-shot template set of a dataset (by tfds or built-in name); ``default`` otherwise."""
    return TEMPLATES.get(dataset) or TEMPLATES.get(dataset_base(dataset), default)


def prompts(dataset: str, classnames=None, templates=None) -> list[list[str]]:
    """Prompts per class: ``out[c][t] = templates[t].format(classnames[c])``.

    ``dataset`` picks the defaults from CLASSNAMES / TEMPLATES; either may be overridden.
    """
    if classnames is None:
        if dataset not in CLASSNAMES:
            raise KeyError(f"no class names for {dataset!r}; known: {sorted(CLASSNAMES)} "
                           f"(pass classnames=...)")
        classnames = CLASSNAMES[dataset]
    if templates is None:
        if dataset not in TEMPLATES:
            raise KeyError(f"no prompt templates for {dataset!r}; known: {sorted(TEMPLATES)} "
                           f"(pass templates=...)")
        templates = TEMPLATES[dataset]
    return [[t.format(c) for t in templates] for c in classnames]
