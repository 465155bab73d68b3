"""A tiny CLIP trained from scratch on the procedural shapes captions (colour, shape, position,
size), CPU in minutes; the retrieval evaluator reports image->text and text->image R@K.

    python -m clipjax.train --config=configs/clip/shapes_tiny.py --workdir=/tmp/clip_shapes
    python -m clipjax.evaluate --config=configs/clip/shapes_tiny.py --workdir=/tmp/clip_shapes

Retrieval uses each eval image's first caption ("a {size} {colour} {shape} in the {position}").
There are 864 attribute combinations and the 1728-image eval split holds each twice, so every
caption is shared by exactly two images: on the raw split R@1 is capped near 0.5-1.0 by those
ties, and chance is 1/1728. ``--config.eval.max_examples=864`` evaluates one image per
combination (all captions distinct; chance 1/864).
"""
from clipjax.config import base_config
from clipjax.data.pipeline import data_config
from clipjax.train import eval_config, model_config


def get_config():
    c = base_config()
    c.task = "clipjax.train:clip_task"
    # 48 px with 8 px patches: a 6x6 grid, finer than the 3x3 grid of positions.
    c.model = model_config(name="tiny-vit", overrides={"text_context_length": 24, "vision_image_size": 48})
    c.data = data_config(source="shapes", image_size=48, context_length=24, crop_scale=(0.9, 1.0))
    c.eval = eval_config(linear_probe_train_examples=1500)
    c.batch_size = 128
    c.total_steps = 800
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = 1.0
    c.train.log_every = 100
    c.train.eval_every = 0
    c.checkpoint.every_steps = 400
    return c
