"""CLIP input pipeline: indexed sources -> tf.data -> host-local numpy batches.

    from clipjax.data import pipeline
    it = pipeline.make_train_iterator(config, start_step, process_index, process_count)
    batch = next(it)   # {'images': b h w 3 float32, 'tokens': b 77 int32[, 'labels': b int32]}
    it.skipped         # bad examples skipped so far, by reason

Modules: ``sources`` (TFDS, TFRecord shards, CSV/JSONL manifests, validation, shard format),
``builtin`` (sklearn digits, procedural shapes), ``pipeline`` (order, resume, batching),
``shards`` (the ``python -m clipjax.data.shards`` converter).
"""
