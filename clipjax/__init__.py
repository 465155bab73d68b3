"""clipjax: CLIP in JAX/Flax — models, tokenizer, training, evaluation, search."""

__version__ = "0.1.0"
