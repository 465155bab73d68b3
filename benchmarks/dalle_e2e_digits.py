"""End to end on sklearn's digits, on CPU: dVAE -> token shards -> DALL-E -> images for "a handwritten 7",
judged by an independent classifier, with and without CLIP reranking, plus image completion.

    JAX_PLATFORMS=cpu python benchmarks/dalle_e2e_digits.py --workdir=/tmp/dalle_e2e

Stages (each is the project's own entry point, run in process, timed in wall and CPU seconds):
  1. dVAE: configs/dvae/digits.py (32 px -> 8x8 codes of 256)               -> WORKDIR/dvae
  2. token shards: dallejax.encode_dataset over the train and test splits   -> WORKDIR/tokens_{train,eval}
  3. DALL-E: configs/dalle/digits.py on the shards (config.data.source='tokens')  -> WORKDIR/dalle
  4. CLIP for reranking: configs/clip/digits_tiny.py                        -> WORKDIR/clip
  5. evaluation (below).
A workdir that already holds a finished run is resumed (no retraining), so a second invocation
only re-evaluates; the stage table then says "resumed".

The judge is an sklearn LogisticRegression trained on the REAL training digits at the decoded
images' format (32 x 32 grey in [0, 1]; the dVAE decodes RGB, averaged to grey), never on dVAE
reconstructions. It is checked on the real held-out digits and on their dVAE reconstructions.

Text -> image: for each digit d, the caption "a handwritten d" (one of the training templates).
``N=1`` classifies every sample; ``best-of-8`` lets CLIP pick the best of each group of 8 samples
of one caption. Completion: a held-out digit's top half of tokens (4 of 8 rows) plus its own
first caption, the rest sampled; the rate is how often the completed image is classified as that
held-out digit. The reference rate is the same question asked of unconditional samples (empty
caption, nothing kept) paired with the same held-out labels: chance, about 10%.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from clipjax import trainer  # noqa: E402
from dallejax import dvae as dvae_lib  # noqa: E402
from dallejax import sampling, train_dalle  # noqa: E402
from dallejax.transformer import model_from_config  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def load_config(relpath: str, **overrides) -> ml_collections.ConfigDict:
    """``configs/...py``'s get_config() with dotted-key overrides."""
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.update_from_flattened_dict(overrides)
    return config


class Clock:
    """Wall and CPU seconds (all threads of this process) of a block."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, _cpu() - self.c


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train(config, workdir: str, task=None):
    task = task if task is not None else trainer.load_task(config)
    return trainer.train(task, config, workdir)


def grey(images: np.ndarray) -> np.ndarray:
    """``n h w 3`` in [0, 1] -> ``n (h w)`` grey features (the classifier's input format)."""
    return np.asarray(images, np.float32).mean(-1).reshape(len(images), -1)


def fit_classifier(image_size: int):
    """LogisticRegression on the real training digits (``image_size`` px grey in [0, 1]).
    Returns (classifier, accuracy on the real held-out digits)."""
    from sklearn.linear_model import LogisticRegression
    from clipjax.data.builtin import DigitsSource
    train_src, test_src = DigitsSource("train", image_size), DigitsSource("test", image_size)
    clf = LogisticRegression(max_iter=3000, C=0.05)
    clf.fit(grey(train_src.images / 255.0), train_src.labels)
    return clf, float(np.mean(clf.predict(grey(test_src.images / 255.0)) == test_src.labels))


def decoder(dvae, dvae_params):
    fn = jax.jit(lambda p, t: dvae.apply({"params": p}, t, method=dvae_lib.DVAE.decode))
    return lambda tokens: np.asarray(fn(dvae_params, jnp.asarray(tokens).reshape(len(tokens), dvae.token_grid,
                                                                                   dvae.token_grid)))


def captions_for_digits(tokenizer, template: str = "a handwritten {}") -> np.ndarray:
    return np.asarray(tokenizer([template.format(d) for d in range(10)]))


def text_to_image(model, params, decode, tokenizer, clf, *, per_digit: int, seed: int, guidance: float = 1.0,
                  rerank_with=None, group: int = 8):
    """Accuracy of the asked digit for N=1 samples (all ``10 * per_digit``) and, when ``rerank_with =
    (clip, variables, clip_tokens)``, for the CLIP-best of each group of ``group`` samples."""
    text = captions_for_digits(tokenizer)
    codes = sampling.sample(model, params, text, jax.random.PRNGKey(seed), num_samples=per_digit,
                            guidance_scale=guidance)
    images = decode(np.asarray(codes))
    asked = np.repeat(np.arange(10), per_digit)
    pred = clf.predict(grey(images))
    out = {"n1": float(np.mean(pred == asked)), "n1_count": len(pred), "images": images, "pred": pred}
    if rerank_with is not None:
        from dallejax.rerank import clip_scores
        clip, variables, clip_text = rerank_with
        scores = np.asarray(clip_scores(clip, variables, images, np.repeat(clip_text, per_digit, axis=0)))
        picks = []
        for d in range(10):
            for g in range(per_digit // group):
                rows = d * per_digit + g * group + np.arange(group)
                picks.append(rows[np.argmax(scores[rows])])
        picks = np.asarray(picks)
        out.update(best=float(np.mean(pred[picks] == asked[picks])), best_count=len(picks), picks=picks)
    return out


def completion(model, params, dvae, dvae_params, decode, clf, heldout: dict, *, seed: int, keep_rows: int):
    """Rates at which completions of held-out digits are classified as that digit, vs unconditional samples."""
    cfg = model.config
    enc = jax.jit(lambda p, x: train_dalle.encode_images(dvae, p, x))
    tokens = np.asarray(enc(dvae_params, jnp.asarray(heldout["image"])))
    labels = heldout["labels"]
    mask = sampling.completion_mask(cfg.grid, keep_rows)
    null = sampling.empty_caption(cfg, len(labels))
    rng = jax.random.PRNGKey(seed)
    rows = {}
    for name, text, fixed in (("caption + top half", heldout["text"], tokens),
                              ("top half, empty caption", null, tokens),
                              ("unconditional (chance)", null, None)):
        kw = dict(fixed_tokens=fixed, fixed_mask=mask) if fixed is not None else {}
        codes = sampling.sample(model, params, text, rng, **kw)
        images = decode(np.asarray(codes))
        rows[name] = float(np.mean(clf.predict(grey(images)) == labels))
    return rows, tokens


def load_clip(config, workdir: str):
    from clipjax.train import build_model
    from clipjax.tokenizer import Tokenizer
    state = trainer.restore_state(config, workdir)
    model = build_model(config.model)
    variables = {"params": state.params, **(state.model_state or {})}
    return model, variables, Tokenizer(context_length=model.config.text.context_length)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/dalle_e2e_digits")
    ap.add_argument("--dvae_steps", type=int, default=0, help="0 = configs/dvae/digits.py's total_steps")
    ap.add_argument("--dalle_steps", type=int, default=0, help="0 = configs/dalle/digits.py's total_steps")
    ap.add_argument("--clip_steps", type=int, default=0, help="0 = configs/clip/digits_tiny.py's total_steps")
    ap.add_argument("--dalle_overrides", default="", help="extra key=value,... for the DALL-E config")
    ap.add_argument("--per_digit", type=int, default=64, help="samples per digit caption (multiple of 8)")
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale of the guided rows (default: config.sampling.guidance_scale)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    w = args.workdir
    os.makedirs(w, exist_ok=True)
    load0 = os.getloadavg()[0]
    stages = []

    def stage(name, clock, note=""):
        stages.append((name, clock.wall, clock.cpu, note))
        print(f"[e2e] {name}: {clock.wall:.1f} s wall, {clock.cpu:.1f} s cpu {note}", flush=True)

    # 1. dVAE
    dvae_cfg = load_config("configs/dvae/digits.py", **{"train.progress_bar": False})
    if args.dvae_steps:
        dvae_cfg.total_steps = args.dvae_steps
        dvae_cfg.loss.temperature_steps = min(dvae_cfg.loss.temperature_steps, args.dvae_steps)
    with dvae_cfg.unlocked():
        dvae_cfg.workdir_for_images = os.path.join(w, "dvae")
    with Clock() as c:
        res = train(dvae_cfg, os.path.join(w, "dvae"))
    stage(f"dVAE ({dvae_cfg.total_steps} steps)", c, f"resumed at {res.start_step}" if res.start_step else
          f"psnr {res.eval_metrics.get('recon/psnr', float('nan')):.1f} dB")

    # 2. token shards
    from dallejax import encode_dataset as enc
    dalle_cfg = load_config("configs/dalle/digits.py", **{"train.progress_bar": False})
    dalle_cfg.dvae.workdir = os.path.join(w, "dvae")
    with Clock() as c:
        reports = {}
        for split in ("train", "eval"):
            out = os.path.join(w, f"tokens_{split}")
            if not os.path.exists(os.path.join(out, "dataset.json")):
                reports[split] = enc.encode_dataset(dalle_cfg, dalle_cfg.dvae.workdir, out, split)
    stage("encode token shards", c, " ".join(f"{k}: {r['examples']} ex, code usage {r['code_usage']:.2f}"
                                            for k, r in reports.items()) or "reused")

    # 3. DALL-E on the shards
    pipeline_cfg = dalle_cfg.copy_and_resolve_references()
    dalle_cfg.data.source = "tokens"
    dalle_cfg.data.path = os.path.join(w, "tokens_train")
    dalle_cfg.data.eval_path = os.path.join(w, "tokens_eval")
    if args.dalle_steps:
        dalle_cfg.total_steps = args.dalle_steps
    for item in filter(None, args.dalle_overrides.split(",")):
        key, value = item.split("=")
        node = dalle_cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = type(node[last])(eval(value)) if not isinstance(node[last], str) else value
    with dalle_cfg.unlocked():
        dalle_cfg.workdir_for_images = os.path.join(w, "dalle")
    with Clock() as c:
        res = train(dalle_cfg, os.path.join(w, "dalle"))
    params = res.state.params
    heldout_loss = res.eval_metrics.get("heldout/image_loss", float("nan"))
    stage(f"DALL-E ({dalle_cfg.total_steps} steps, batch {dalle_cfg.batch_size})", c,
          f"resumed at {res.start_step}" if res.start_step else f"held-out image CE {heldout_loss:.3f}")

    # 4. CLIP for reranking
    clip_cfg = load_config("configs/clip/digits_tiny.py", **{"train.progress_bar": False})
    clip_cfg.eval.update(dict(retrieval=False, linear_probe=False))
    if args.clip_steps:
        clip_cfg.total_steps = args.clip_steps
    with Clock() as c:
        res = train(clip_cfg, os.path.join(w, "clip"))
    zs = res.eval_metrics.get("zero_shot/top1", res.eval_metrics.get("zero_shot/accuracy", float("nan")))
    stage(f"CLIP ({clip_cfg.total_steps} steps)", c, f"resumed at {res.start_step}" if res.start_step else
          f"zero-shot {zs:.3f}")

    # 5. evaluation
    with Clock() as c:
        model = model_from_config(dalle_cfg.model)
        dvae = train_dalle.dvae_model(dalle_cfg.dvae)
        dvae_params = train_dalle.load_dvae_params(dalle_cfg.dvae.workdir)
        decode = decoder(dvae, dvae_params)
        clf, real_acc = fit_classifier(dvae.image_size)
        heldout = train_dalle.load_heldout(pipeline_cfg, 0)
        tokenizer = train_dalle._tokenizer(model.config.text_len)
        clip, clip_vars, clip_tok = load_clip(clip_cfg, os.path.join(w, "clip"))
        comp, held_tokens = completion(model, params, dvae, dvae_params, decode, clf, heldout, seed=args.seed + 1,
                                       keep_rows=model.config.grid // 2)
        recon_acc = float(np.mean(clf.predict(grey(decode(held_tokens))) == heldout["labels"]))
        guidance = float(dalle_cfg.sampling.guidance_scale if args.guidance is None else args.guidance)
        t2i = text_to_image(model, params, decode, tokenizer, clf, per_digit=args.per_digit, seed=args.seed,
                            rerank_with=(clip, clip_vars, captions_for_digits(clip_tok)))
        guided = None
        if guidance != 1.0:
            guided = text_to_image(model, params, decode, tokenizer, clf, per_digit=args.per_digit,
                                   seed=args.seed, guidance=guidance,
                                   rerank_with=(clip, clip_vars, captions_for_digits(clip_tok)))
        from dallejax.images import save_grid
        order = np.concatenate([np.arange(d * args.per_digit, d * args.per_digit + 8) for d in range(10)])
        shown = guided if guided is not None else t2i
        save_grid(os.path.join(w, "samples_n1.png"), shown["images"][order], cols=8)
        save_grid(os.path.join(w, "samples_best_of_8.png"), shown["images"][shown["picks"]],
                  cols=args.per_digit // 8)
    stage("evaluation", c)

    total_wall = sum(s[1] for s in stages)
    total_cpu = sum(s[2] for s in stages)
    print()
    print(f"machine: {os.cpu_count()} CPUs, load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
          f"JAX {jax.__version__} on {jax.devices()[0].platform}")
    print(f"| {'stage':<40} | {'wall s':>8} | {'cpu s':>8} | note")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 10}|------")
    for name, wall, cpu, note in stages:
        print(f"| {name:<40} | {wall:8.1f} | {cpu:8.1f} | {note}")
    print(f"| {'total':<40} | {total_wall:8.1f} | {total_cpu:8.1f} |")
    print()
    rows = [
        ("classifier on real held-out digits", real_acc, len(heldout["labels"])),
        ("classifier on dVAE reconstructions (held-out)", recon_acc, len(heldout["labels"])),
        ('"a handwritten d": N=1, no guidance', t2i["n1"], t2i["n1_count"]),
        ('"a handwritten d": best-of-8 CLIP rerank, no guidance', t2i["best"], t2i["best_count"]),
    ]
    if guided is not None:
        rows += [(f'"a handwritten d": N=1, guidance {guidance:g}', guided["n1"], guided["n1_count"]),
                 (f'"a handwritten d": best-of-8 CLIP rerank, guidance {guidance:g}', guided["best"],
                  guided["best_count"])]
    rows += [(f"completion: {k}", v, len(heldout["labels"])) for k, v in comp.items()]
    print(f"| {'accuracy (classified as the asked / held-out digit)':<55} | {'value':>6} | {'n':>5}")
    print(f"|{'-' * 57}|{'-' * 8}|{'-' * 7}")
    for name, value, n in rows:
        print(f"| {name:<55} | {value:6.3f} | {n:5d}")
    for name, res in (("no guidance", t2i), (f"guidance {guidance:g}", guided)):
        if res is not None:
            per = [float(np.mean(res["pred"][d * args.per_digit:(d + 1) * args.per_digit] == d)) for d in range(10)]
            print(f"N=1 per digit, {name}: " + " ".join(f"{d}:{a:.2f}" for d, a in enumerate(per)))
    print(f"grids: {os.path.join(w, 'samples_n1.png')}, {os.path.join(w, 'samples_best_of_8.png')}")
    return {"stages": stages, "rows": rows}


if __name__ == "__main__":
    main()
