"""clipjax: CLIP in JAX/Flax — models, tokenizer, training, evaluation, search."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy top-level API: `import clipjax` stays cheap (no jax/tf import) until used.
    if name in ("load", "zero_shot_classifier"):
        from clipjax import api
        return getattr(api, name)
    raise AttributeError(f"module 'clipjax' has no attribute {name!r}")
