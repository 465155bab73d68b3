"""dVAE encode/decode throughput: dallejax (jit, NHWC) vs the dall_e package (torch, f32).

Both run on the CPU in one process, pinned to the same cores (``--threads``), with the same
batch and random-init full-size weights converted from the torch modules (outputs are checked
to agree). Repetitions alternate torch / jax; the table shows median images/s and the ratio.

    python benchmarks/dvae.py --batch=4 --reps=7 --threads=2
    python benchmarks/dvae.py --xla_flags=--xla_cpu_use_onednn=true   # try XLA CPU options

Encode = ``map_pixels`` -> encoder -> argmax tokens. Decode = tokens -> decoder ->
``unmap_pixels(sigmoid(mu))``; the reference takes a one-hot float input (its API), dallejax
takes int tokens and gathers the input-conv rows (mathematically the same 1x1 conv).
"""
import os
import statistics
import sys
import time

from absl import app, flags

flags.DEFINE_integer("batch", 4, "images per call")
flags.DEFINE_integer("image_size", 256, "pixels per side")
flags.DEFINE_integer("reps", 5, "timed repetitions per framework (alternating)")
flags.DEFINE_integer("threads", 0, "CPU cores for both frameworks (0 = all available)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dallejax compute dtype")
flags.DEFINE_list("modes", ["encode", "decode"], "what to time")
flags.DEFINE_string("xla_flags", "", "extra XLA_FLAGS for the jax side (e.g. --xla_cpu_use_onednn=true)")
FLAGS = flags.FLAGS


def _median_time(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv):
    del argv
    cores = sorted(os.sched_getaffinity(0))
    threads = FLAGS.threads or len(cores)
    os.sched_setaffinity(0, cores[:threads])  # same cores for torch and XLA's thread pool
    if FLAGS.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAGS.xla_flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import dall_e
    from dallejax import convert, dvae

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    b, s = FLAGS.batch, FLAGS.image_size
    t_enc, t_dec = dall_e.Encoder().eval(), dall_e.Decoder().eval()
    _, cfg_e, v_enc = convert.from_torch_module(t_enc)
    _, cfg_d, v_dec = convert.from_torch_module(t_dec)
    dtype = jnp.dtype(FLAGS.dtype)
    model = dvae.DVAE(n_hid=cfg_e["n_hid"], vocab_size=cfg_e["vocab_size"], image_size=s, dtype=dtype)
    variables = jax.device_put(convert.dvae_variables(v_enc, v_dec))

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (b, s, s, 3)).astype(np.float32)
    grid = s // 8
    tokens = rng.integers(0, 8192, (b, grid, grid)).astype(np.int32)
    images_nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    tokens_t = torch.from_numpy(tokens.astype(np.int64))

    def torch_encode():
        with torch.inference_mode():
            return torch.argmax(t_enc(dall_e.map_pixels(images_nchw)), dim=1)

    def torch_decode():
        with torch.inference_mode():
            z = torch.nn.functional.one_hot(tokens_t, 8192).permute(0, 3, 1, 2).float()
            stats = t_dec(z)
            return dall_e.unmap_pixels(torch.sigmoid(stats[:, :3]))

    jax_encode = jax.jit(lambda v, x: model.apply(v, x, method=dvae.DVAE.encode))
    jax_decode = jax.jit(lambda v, t: model.apply(v, t, method=dvae.DVAE.decode))
    x_dev, t_dev = jax.device_put(images), jax.device_put(tokens)
    runs = {
        "encode": (torch_encode, lambda: jax_encode(variables, x_dev).block_until_ready()),
        "decode": (torch_decode, lambda: jax_decode(variables, t_dev).block_until_ready()),
    }

    print(f"dVAE {s}px batch {b}, {threads} thread(s), torch {torch.__version__} f32 NCHW vs "
          f"jax {jax.__version__} {FLAGS.dtype} NHWC on {jax.devices()[0].platform}"
          + (f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""))
    rows = []
    for mode in FLAGS.modes:
        ref_fn, jax_fn = runs[mode]
        t0 = time.perf_counter()
        ours = np.asarray(jax_fn())  # compile + warm up
        compile_s = time.perf_counter() - t0
        ref = ref_fn().numpy()
        if mode == "encode":
            agree = float(np.mean(ours == ref))
            check = f"token agreement {agree:.4f}"
        else:
            check = f"max|delta| {np.abs(ours - ref.transpose(0, 2, 3, 1)).max():.2e}"
        times = {"torch": [], "jax": []}
        for _ in range(FLAGS.reps):
            times["torch"].append(_median_time(ref_fn))
            times["jax"].append(_median_time(jax_fn))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((mode, b / med["torch"], b / med["jax"], med["torch"] / med["jax"], compile_s, check))

    print(f"{'mode':8s} {'torch img/s':>12s} {'jax img/s':>10s} {'ratio':>7s} {'jit s':>7s}  check")
    for mode, ti, ji, ratio, cs, check in rows:
        print(f"{mode:8s} {ti:12.3f} {ji:10.3f} {ratio:6.2f}x {cs:7.1f}  {check}")


if __name__ == "__main__":
    app.run(main)
