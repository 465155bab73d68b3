"""CLIP RN50x64 at paper scale (see configs/clip/common.py)."""
from configs.clip.common import paper_config


def get_config():
    c = paper_config("RN50x64", lr=0.00036, image_size=448)
    return c
