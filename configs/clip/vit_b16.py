"""CLIP ViT-B-16 at paper scale (see configs/clip/common.py)."""
from configs.clip.common import paper_config


def get_config():
    c = paper_config("ViT-B-16", lr=0.0005, image_size=224)
    return c
