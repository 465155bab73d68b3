"""A small dVAE on the procedural shapes (flat colours on a plain background) at 32 px:
8x8 tokens, 256 codes, CPU in minutes.

    python -m dallejax.train_dvae --config=configs/dvae/shapes.py --workdir=/tmp/dvae_shapes

Everything but the data is configs/dvae/digits.py (paper objective with the schedules shortened);
the images are RGB, so colour is part of what the codes must carry.
"""
from clipjax.data.pipeline import data_config
from configs.dvae import digits


def get_config():
    c = digits.get_config()
    c.data = data_config(source="shapes", image_size=32, context_length=24, crop_scale=(1.0, 1.0))
    return c
