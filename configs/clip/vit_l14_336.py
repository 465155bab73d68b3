"""CLIP ViT-L-14-336 at paper scale (see configs/clip/common.py)."""
from configs.clip.common import paper_config


def get_config():
    c = paper_config("ViT-L-14-336", lr=2e-05, image_size=336)
    # The paper trains L/14 at 224 px, then one extra epoch at 336 px (FixRes-style).
    c.total_steps = 400_000_000 // c.batch_size
    c.model.init_from = ''  # set to the L/14 checkpoint to fine-tune from
    return c
