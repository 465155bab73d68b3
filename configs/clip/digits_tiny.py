"""A tiny CLIP trained from scratch on sklearn's digits (real data, offline), CPU in minutes.

    python -m clipjax.train --config=configs/clip/digits_tiny.py --workdir=/tmp/clip_digits
"""
from clipjax.config import base_config
from clipjax.data.pipeline import data_config
from clipjax.train import eval_config, model_config


def get_config():
    c = base_config()
    c.task = "clipjax.train:clip_task"
    c.model = model_config(name="tiny-vit", overrides={"text_context_length": 16})
    c.data = data_config(source="digits", image_size=32, context_length=16, crop_scale=(0.8, 1.0))
    c.eval = eval_config(linear_probe_train_examples=1500)
    c.batch_size = 128
    c.total_steps = 600
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = 1.0
    c.train.log_every = 50
    c.train.eval_every = 0
    c.checkpoint.every_steps = 200
    return c
