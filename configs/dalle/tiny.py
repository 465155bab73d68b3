"""A tiny DALL-E for tests and CPU smoke runs: CLIP BPE text (16 tokens), a 4 x 4 grid of 32 codes.

The text vocabulary is CLIP's (49,408) so ``python -m dallejax.generate`` works with the real
tokenizer; everything else is small (width 32, 4 layers = row, column, row, conv).
"""
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict(dict(
        text_vocab_size=49408, text_len=16, image_vocab_size=32, grid=4,
        width=32, num_layers=4, num_heads=2, mlp_ratio=4.0,
        attention="dalle", conv_kernel=3, eot_id=-1, activation="gelu",
        dtype="float32", param_dtype="float32", scan=False, remat_policy="none"))
    c.dvae = ConfigDict(dict(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=32, input_channels=3,
                             n_init=8, image_size=8))
    c.sampling = ConfigDict(dict(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0, batch=16))
    return c
