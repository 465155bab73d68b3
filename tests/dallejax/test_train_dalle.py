"""DALL-E training task: text dropout, data modes (pipeline + dVAE in the step; encoded token shards),
the loss going down, a dalle workdir resuming exactly, and config errors naming their key.

Everything uses one tiny random dVAE (8 px digits -> 4x4 codes, 32 of them) and a width-32 transformer,
shared through module fixtures.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import serialization

from clipjax import trainer
from clipjax.config import ConfigError, base_config
from clipjax.data.pipeline import data_config
from dallejax import dvae as dvae_lib
from dallejax import encode_dataset as enc
from dallejax import train_dalle

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DVAE_FIELDS = dict(group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=32, input_channels=3, n_init=8,
                   image_size=8)


def make_config(dvae_path: str, **overrides) -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "dallejax.train_dalle:dalle_task"
    c.seed = 3
    c.model = ml_collections.ConfigDict(dict(
        text_vocab_size=49408, text_len=16, image_vocab_size=32, grid=4, width=32, num_layers=2, num_heads=2,
        attention="dalle", conv_kernel=3))
    c.dvae = ml_collections.ConfigDict(dict(model=ml_collections.ConfigDict(DVAE_FIELDS), workdir=dvae_path,
                                            decoder=""))
    c.data = data_config(source="digits", image_size=8, context_length=16, crop_scale=(1.0, 1.0))
    c.loss = ml_collections.ConfigDict(dict(text_weight=0.125))
    c.text_dropout = 0.25
    c.eval = train_dalle.eval_config(heldout=False, num_images=64, batch_size=32)
    c.batch_size = 8
    c.total_steps = 6
    c.optim.update(dict(lr=3e-3, b2=0.96, weight_decay=4.5e-2, grad_clip_norm=4.0, schedule="constant"))
    c.train.update(dict(log_every=1, progress_bar=False))
    c.checkpoint.update(dict(every_steps=0, async_save=False))
    c.count_flops = False
    c.update_from_flattened_dict(overrides)
    return c


@pytest.fixture(scope="module")
def dvae_file(tmp_path_factory):
    model = dvae_lib.model_from_config({"model": DVAE_FIELDS})
    params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3))))["params"]
    path = str(tmp_path_factory.mktemp("dvae") / "dvae.msgpack")
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize({"params": jax.tree.map(np.asarray, params)}))
    return path


@pytest.fixture(scope="module")
def token_dirs(dvae_file, tmp_path_factory):
    """Token shards of 96 training and 48 held-out digits (2 + 1 shards) and their reports."""
    root = tmp_path_factory.mktemp("tokens")
    config = make_config(dvae_file)
    train = enc.encode_dataset(config, dvae_file, str(root / "train"), "train", num_shards=2, batch=32,
                               max_examples=96)
    heldout = enc.encode_dataset(config, dvae_file, str(root / "eval"), "eval", num_shards=1, batch=32,
                                 max_examples=48)
    return str(root / "train"), str(root / "eval"), train, heldout


def test_text_dropout_is_deterministic_and_has_the_asked_rate():
    text = jnp.arange(400 * 6, dtype=jnp.int32).reshape(400, 6)
    null = jnp.asarray([9, 8, 0, 0, 0, 0], jnp.int32)
    key = jax.random.PRNGKey(0)
    a = train_dalle.drop_captions(key, text, null, 0.25)
    np.testing.assert_array_equal(a, train_dalle.drop_captions(key, text, null, 0.25))
    dropped = np.all(np.asarray(a) == np.asarray(null), axis=1)
    kept = np.all(np.asarray(a) == np.asarray(text), axis=1)
    assert np.all(dropped | kept)
    assert 0.18 < dropped.mean() < 0.32, dropped.mean()
    other = train_dalle.drop_captions(jax.random.PRNGKey(1), text, null, 0.25)
    assert not np.array_equal(a, other)
    np.testing.assert_array_equal(train_dalle.drop_captions(key, text, null, 0.0), text)


def test_encode_dataset_writes_the_dvae_codes(dvae_file, token_dirs):
    train_dir, eval_dir, train_report, eval_report = token_dirs
    assert train_report["examples"] == 96 and eval_report["examples"] == 48
    meta = json.load(open(os.path.join(train_dir, "dataset.json")))
    assert meta["format"] == "dallejax.tokens/1" and [s["records"] for s in meta["shards"]] == [48, 48]
    assert meta["grid"] == 4 and meta["image_vocab_size"] == 32 and meta["text_len"] == 16
    shards = train_dalle.TokenShards(eval_dir)
    assert len(shards) == 48
    # The stored codes are the dVAE's argmax codes of the pipeline's held-out images, in order.
    config = make_config(dvae_file)
    held = train_dalle.load_heldout(config, 48)
    model = train_dalle.dvae_model(config.dvae)
    params = train_dalle.load_dvae_params(dvae_file)
    want = np.asarray(train_dalle.encode_images(model, params, jnp.asarray(held["image"])))
    got = np.stack([shards.read(i)[1] for i in range(48)])
    np.testing.assert_array_equal(got, want)
    text, _, label = shards.read(5)
    assert text.shape == (12, 16) and label == held["labels"][5]       # every digits caption template
    np.testing.assert_array_equal(text[0], held["text"][5])
    with pytest.raises(enc.EncodeError, match="--overwrite"):
        enc.encode_dataset(config, dvae_file, eval_dir, "eval")


def test_token_data_is_addressed_by_step(dvae_file, token_dirs):
    train_dir, _, _, _ = token_dirs
    config = make_config(dvae_file, **{"data.source": "tokens", "data.path": train_dir, "batch_size": 32})
    data = train_dalle.token_data_fn(config)
    it = data(0, 0, 1)
    batches = [next(it) for _ in range(4)]
    resumed = next(data(3, 0, 1))
    for k in ("text", "image_tokens"):
        np.testing.assert_array_equal(resumed[k], batches[3][k])
    assert batches[0]["text"].shape == (32, 16) and batches[0]["image_tokens"].shape == (32, 16)
    # Steps 0-2 are one epoch of 96 examples: every example exactly once.
    idx = train_dalle.token_batch_indices(3, 0, 96, 96, np.arange(96))
    assert sorted(idx.tolist()) == list(range(96))
    # Two processes split each global batch.
    halves = [next(data(3, p, 2)) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["image_tokens"] for h in halves]), resumed["image_tokens"])


def test_loss_decreases_in_tokens_mode(dvae_file, token_dirs):
    train_dir, eval_dir, _, _ = token_dirs
    config = make_config(dvae_file, **{"data.source": "tokens", "data.path": train_dir, "data.eval_path": eval_dir,
                                       "eval.heldout": True, "batch_size": 16, "text_dropout": 0.0})
    task = train_dalle.dalle_task(config)
    tr = trainer.Trainer(task, config)
    state = tr.init_state()
    heldout = task.evaluators["heldout"]
    before = heldout(state.params, state.model_state, 0)
    dvae_before = jax.tree.map(np.asarray, state.model_state["dvae"])
    data = task.data(0, 0, 1)
    losses = []
    for _ in range(40):
        state, metrics = tr.step(state, tr.place_batch(next(data)))
        losses.append(float(metrics["loss"]))
    after = heldout(state.params, state.model_state, 40)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses
    assert after["loss"] < before["loss"] - 1.0 and after["image_loss"] < before["image_loss"], (before, after)
    assert set(before) == {"loss", "text_loss", "image_loss", "image_accuracy"}
    # The dVAE rides along in model_state and is never updated.
    jax.tree.map(np.testing.assert_array_equal, dvae_before, jax.tree.map(np.asarray, state.model_state["dvae"]))


def test_pipeline_mode_workdir_resumes_exactly(dvae_file, tmp_path):
    """Pipeline mode (images encoded by the dVAE inside the step, captions dropped by the step rng):
    3 steps, then a second run resumes to 6; equal to 6 uninterrupted steps."""
    config = make_config(dvae_file)
    task = train_dalle.dalle_task(config)
    half = make_config(dvae_file, total_steps=3)
    first = trainer.train(task, half, str(tmp_path / "a"))
    assert first.status == "done" and np.isfinite(first.last_metrics["loss"])
    resumed = trainer.train(task, config, str(tmp_path / "a"))
    assert resumed.start_step == 3 and int(resumed.state.step) == 6
    straight = trainer.train(task, config, str(tmp_path / "b"))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed.state.params),
                 jax.tree.map(np.asarray, straight.state.params))
    restored = trainer.restore_state(config, str(tmp_path / "a"), task)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.model_state["dvae"]),
                 jax.tree.map(np.asarray, train_dalle.load_dvae_params(dvae_file)))


def test_config_errors_name_the_key(dvae_file, tmp_path):
    with pytest.raises(ConfigError, match="config.dvae.workdir is empty"):
        train_dalle.dalle_task(make_config(""))
    with pytest.raises(ConfigError, match="config.data.context_length"):
        train_dalle.dalle_task(make_config(dvae_file, **{"data.context_length": 12}))
    with pytest.raises(ConfigError, match="image_vocab_size"):
        train_dalle.dalle_task(make_config(dvae_file, **{"model.image_vocab_size": 64}))
    with pytest.raises(ConfigError, match="config.text_dropout"):
        train_dalle.dalle_task(make_config(dvae_file, text_dropout=1.0))
    with pytest.raises(ConfigError, match="does not fit config.dvae.model"):
        train_dalle.dalle_task(make_config(dvae_file, **{"dvae.model.n_hid": 16}))
    with pytest.raises(ConfigError, match="config.data.path: .*dataset.json"):
        train_dalle.dalle_task(make_config(dvae_file, **{"data.source": "tokens", "data.path": str(tmp_path)}))


def test_cli_reports_a_missing_dvae_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dallejax.train_dalle", f"--config={ROOT}/configs/dalle/digits.py",
         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "config.dvae.workdir" in last, proc.stderr[-2000:]
