"""CLIP RN50x4 at paper scale (see configs/clip/common.py)."""
from configs.clip.common import paper_config


def get_config():
    c = paper_config("RN50x4", lr=0.0005, image_size=288)
    return c
