"""Paper-scale CLIP recipes (Radford et al. 2021, Tables 19-20): batch 32,768, Adam
(beta2 0.98, eps 1e-6), weight decay 0.2, 2,000 warmup steps, cosine decay, 32 epochs of 400M
pairs (~390k steps), bf16 compute. Data: TFRecord shards from `python -m clipjax.data.shards`
(set --config.data.path=gs://.../train-*.tfrecord)."""
from clipjax.config import base_config
from clipjax.data.pipeline import data_config
from clipjax.train import eval_config, model_config

PAPER_SAMPLES = 32 * 400_000_000


def paper_config(name: str, lr: float, image_size: int, total_samples: int = PAPER_SAMPLES):
    c = base_config()
    c.task = "clipjax.train:clip_task"
    c.model = model_config(name=name, dtype="bfloat16", scan=True, remat_policy="dots_with_no_batch_dims_saveable")
    c.data = data_config(source="shards", image_size=image_size, crop_scale=(0.9, 1.0),
                         eval_path="")
    c.eval = eval_config(linear_probe=False)
    c.batch_size = 32768
    c.total_steps = total_samples // c.batch_size
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.optim.update(dict(lr=lr, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, warmup_steps=2000,
                        schedule="cosine", grad_clip_norm=0.0))
    c.train.log_every = 100
    c.train.eval_every = 5000
    c.checkpoint.every_steps = 2000
    return c
