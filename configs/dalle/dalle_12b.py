"""DALL-E 12B (Ramesh et al. 2021): shape and sampling settings, no training wiring yet.

64 layers, 62 heads x 64 (width 3,968), 256 text tokens from a 16,384 BPE vocabulary (+ one
learned padding token per text position), 32 x 32 = 1,024 image tokens from the dVAE's 8,192
codes; the paper's sparse attention schedule (row / column every 4th layer from the 2nd / 11x11
convolutional last layer). ``jax.eval_shape`` counts 12.29B parameters
(tests/dallejax/test_transformer.py).

The paper's 16,384 text vocabulary is its own BPE, not CLIP's 49,408; to sample with the CLIP
tokenizer set ``--config.model.text_vocab_size=49408``.
"""
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict(dict(
        text_vocab_size=16384, text_len=256, image_vocab_size=8192, grid=32,
        width=62 * 64, num_layers=64, num_heads=62, mlp_ratio=4.0,
        attention="dalle", conv_kernel=11, eot_id=-1, activation="gelu",
        dtype="bfloat16", param_dtype="float32", scan=True, remat_policy="dots_with_no_batch_dims_saveable"))
    # The dVAE that turns images into the 32 x 32 token grid (dallejax.dvae.DVAE fields).
    c.dvae = ConfigDict(dict(group_count=4, n_hid=256, n_blk_per_group=2, vocab_size=8192, input_channels=3,
                             n_init=128, image_size=256))
    # Defaults of python -m dallejax.generate (flags override them).
    c.sampling = ConfigDict(dict(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0, batch=16))
    return c
