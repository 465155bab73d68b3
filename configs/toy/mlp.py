"""Toy MLP regression through the shared trainer (tests and demos of the substrate)."""
from ml_collections import ConfigDict

from clipjax.config import base_config


def get_config() -> ConfigDict:
    c = base_config()
    c.task = "clipjax.toy:make_task"
    c.batch_size = 64
    c.total_steps = 60
    c.model = ConfigDict(dict(d_in=16, hidden=64, d_out=8, data_delay_s=0.0, nan_at_step=-1))
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 1.0
    c.train.log_every = 10
    c.train.eval_every = 30
    c.train.progress_bar = False
    c.checkpoint.every_steps = 20
    return c
