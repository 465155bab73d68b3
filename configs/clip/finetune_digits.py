"""Fine-tune the tiny digits CLIP for 10-way classification (zero-shot-initialised head).

    python -m clipjax.train --config=configs/clip/digits_tiny.py --workdir=/tmp/clip_digits
    python -m clipjax.finetune --config=configs/clip/finetune_digits.py --workdir=/tmp/ft_digits \
        --config.init.workdir=/tmp/clip_digits

The architecture comes from the CLIP run (config.init.config); or start from a weights file with
--config.init.workdir= --config.model.name=tiny-vit --config.model.init_from=w.msgpack.
"""
from clipjax.config import base_config
from clipjax.data.pipeline import data_config
from clipjax.finetune import finetune_config, init_config
from clipjax.train import model_config


def get_config():
    c = base_config()
    c.task = "clipjax.finetune:finetune_task"
    c.init = init_config(workdir="/tmp/clip_digits", config="configs/clip/digits_tiny.py")
    # name '' = the architecture of the run in config.init; set name/init_from for weights files.
    c.model = model_config(name="", overrides={"text_context_length": 16})
    c.data = data_config(source="digits", image_size=32, context_length=16, crop_scale=(0.8, 1.0))
    c.finetune = finetune_config()
    c.batch_size = 128
    c.total_steps = 150
    c.optim.lr = 3e-4           # ~1/7 of the CLIP run's: keep the zero-shot start, adapt gently
    c.optim.warmup_steps = 15
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = 1.0
    c.train.log_every = 50
    c.train.eval_every = 0
    c.checkpoint.every_steps = 0
    return c
