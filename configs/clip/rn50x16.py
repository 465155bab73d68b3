"""CLIP RN50x16 at paper scale (see configs/clip/common.py)."""
from configs.clip.common import paper_config


def get_config():
    c = paper_config("RN50x16", lr=0.0004, image_size=384)
    return c
