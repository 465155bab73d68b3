"""The paper's dVAE: 256 px -> 32x32 tokens, vocab 8192 (Ramesh et al. 2021, appendix A.2).

Batch 512, 3M updates, AdamW (0.9, 0.999, eps 1e-8, wd 1e-4), lr 1e-4 cosine-decayed to 1.25e-6
over the first 1.2M updates, temperature 1 -> 1/16 over 150k updates, KL weight 0 -> 6.6 over 5k updates, EMA 0.999.
Data: TFRecord shards (--config.data.path=...).
"""
import ml_collections

from clipjax.config import base_config
from clipjax.data.pipeline import data_config
from dallejax.dvae import default_config


def get_config():
    c = base_config()
    c.task = "dallejax.train_dvae:dvae_task"
    d = default_config()
    c.model, c.loss = d.model, d.loss
    c.model.dtype = "bfloat16"
    c.data = data_config(source="shards", image_size=256, crop_scale=(0.8, 1.0))
    c.eval = ml_collections.ConfigDict(dict(num_images=1024))
    c.batch_size = 512
    c.total_steps = 3_000_000
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.optim.update(dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, warmup_steps=0,
                        schedule="cosine", end_lr_ratio=1.25e-6 / 1e-4, decay_steps=1_200_000,
                        ema_decay=0.999))
    c.train.log_every = 100
    c.train.eval_every = 10_000
    c.checkpoint.every_steps = 5000
    c.workdir_for_images = ""
    return c
