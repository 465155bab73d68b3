"""CLIP ViT-L-14 at paper scale (see configs/clip/common.py)."""
from configs.clip.common import paper_config


def get_config():
    c = paper_config("ViT-L-14", lr=0.0004, image_size=224)
    return c
