"""OpenAI / open_clip checkpoints <-> clipjax variables.

Import: a TorchScript ``.pt`` (OpenAI's release; needs torch), a state dict ``.pt``/``.pth``/``.bin``
(read without torch by :mod:`clipjax.torch_pickle`; torch is only a fallback), or ``.safetensors``
(no torch) -> ``{'params': ..., 'batch_stats': ...}`` for :class:`clipjax.models.CLIP`.
Export: clipjax variables -> an open_clip state dict saved as ``.safetensors`` that
``open_clip.create_model(name).load_state_dict(sd, strict=True)`` accepts.

The whole name mapping is the table :data:`MAPPING` below: one row per tensor kind,
``(clipjax path, open_clip name, transform)``. Placeholders ``{L}`` (transformer layer), ``{S}``
(ResNet stage 1-4), ``{B}`` (block in a stage), ``{n}`` (1-3) and ``{T}`` / ``{t}`` (transformer
prefix: ``visual/transformer`` <-> ``visual.transformer``, ``text/transformer`` <-> ``transformer``)
stand for the same value on both sides. clipjax paths start with the variable collection.

clipjax file format (``.msgpack``): ``flax.serialization.msgpack_serialize`` of
``{'format': 'clipjax-v1', 'model': <registry name or ''>, 'config': <CLIPConfig as JSON>,
'variables': {'params': ..., ['batch_stats': ...]}}`` with plain (unboxed, unscanned) numpy arrays.
Read it back with :func:`load_clipjax`.

CLI::

    python -m clipjax.convert --model ViT-B-32 --src in.pt --dst out.msgpack      # -> clipjax
    python -m clipjax.convert --src ViT-B-32.pt --dst out.msgpack                 # infer the architecture
    python -m clipjax.convert --model ViT-B-32 --src out.msgpack --dst oc.safetensors   # -> open_clip

The direction follows from the extensions (or ``--to=clipjax|open_clip``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from typing import Any, Callable, Mapping, Optional

import numpy as np

# ----------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of pure functions: open_clip array -> clipjax array (given the clipjax shape) and back."""
    name: str
    to_jax: Callable[[np.ndarray, tuple], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _linear(n_in: int) -> Transform:
    # torch Linear weight is (out, in); ours is (*in, *out) with ``n_in`` input axes.
    return Transform(f"linear(in_axes={n_in})",
                     lambda a, shape: a.T.reshape(shape),
                     lambda a: a.reshape(int(np.prod(a.shape[:n_in])), -1).T)


SAME = Transform("same", lambda a, shape: a.reshape(shape), lambda a: a)
LINEAR = _linear(1)                     # (out, in) -> (in, out)
LINEAR_OUT = _linear(2)                 # attention out_proj: (d, h*k) -> (h, k, d)
QKV = Transform("in_proj (3d, d) -> (d, 3, heads, kv)",
                lambda a, shape: a.T.reshape(shape), lambda a: a.reshape(a.shape[0], -1).T)
FLAT = Transform("reshape", lambda a, shape: a.reshape(shape), lambda a: a.reshape(-1))
CONV = Transform("conv OIHW -> HWIO", lambda a, shape: a.transpose(2, 3, 1, 0).reshape(shape),
                 lambda a: a.transpose(3, 2, 0, 1))

_BLOCK = [  # one pre-LN transformer block
    ("ln_1/scale", "ln_1.weight", SAME), ("ln_1/bias", "ln_1.bias", SAME),
    ("attn/qkv/kernel", "attn.in_proj_weight", QKV), ("attn/qkv/bias", "attn.in_proj_bias", FLAT),
    ("attn/out/kernel", "attn.out_proj.weight", LINEAR_OUT), ("attn/out/bias", "attn.out_proj.bias", SAME),
    ("ln_2/scale", "ln_2.weight", SAME), ("ln_2/bias", "ln_2.bias", SAME),
    ("mlp/fc/kernel", "mlp.c_fc.weight", LINEAR), ("mlp/fc/bias", "mlp.c_fc.bias", SAME),
    ("mlp/proj/kernel", "mlp.c_proj.weight", LINEAR), ("mlp/proj/bias", "mlp.c_proj.bias", SAME),
]
_BN = [("params", "scale", "weight"), ("params", "bias", "bias"),
       ("batch_stats", "mean", "running_mean"), ("batch_stats", "var", "running_var")]

#: (clipjax path, open_clip name, transform). Read top to bottom, this is the whole mapping.
MAPPING: list[tuple[str, str, Transform]] = [
    # --- transformer blocks (both towers) ---
    *[(f"params/{{T}}/layers_{{L}}/{j}", f"{{t}}.resblocks.{{L}}.{o}", tr) for j, o, tr in _BLOCK],
    # --- ViT image tower ---
    ("params/visual/patch_embed", "visual.conv1.weight", CONV),
    ("params/visual/class_embedding", "visual.class_embedding", SAME),
    ("params/visual/positional_embedding", "visual.positional_embedding", SAME),
    ("params/visual/ln_pre/scale", "visual.ln_pre.weight", SAME),
    ("params/visual/ln_pre/bias", "visual.ln_pre.bias", SAME),
    ("params/visual/ln_post/scale", "visual.ln_post.weight", SAME),
    ("params/visual/ln_post/bias", "visual.ln_post.bias", SAME),
    ("params/visual/proj", "visual.proj", SAME),
    # --- ModifiedResNet image tower ---
    ("params/visual/conv{n}/kernel", "visual.conv{n}.weight", CONV),
    *[(f"{c}/visual/bn{{n}}/{j}", f"visual.bn{{n}}.{o}", SAME) for c, j, o in _BN],
    ("params/visual/layer{S}_{B}/conv{n}/kernel", "visual.layer{S}.{B}.conv{n}.weight", CONV),
    *[(f"{c}/visual/layer{{S}}_{{B}}/bn{{n}}/{j}", f"visual.layer{{S}}.{{B}}.bn{{n}}.{o}", SAME) for c, j, o in _BN],
    ("params/visual/layer{S}_{B}/downsample_conv/kernel", "visual.layer{S}.{B}.downsample.0.weight", CONV),
    *[(f"{c}/visual/layer{{S}}_{{B}}/downsample_bn/{j}", f"visual.layer{{S}}.{{B}}.downsample.1.{o}", SAME)
      for c, j, o in _BN],
    ("params/visual/attnpool/positional_embedding", "visual.attnpool.positional_embedding", SAME),
    *[(f"params/visual/attnpool/{p}_proj/kernel", f"visual.attnpool.{p}_proj.weight", LINEAR) for p in "qkvc"],
    *[(f"params/visual/attnpool/{p}_proj/bias", f"visual.attnpool.{p}_proj.bias", SAME) for p in "qkvc"],
    # --- text tower ---
    ("params/text/token_embedding", "token_embedding.weight", SAME),
    ("params/text/positional_embedding", "positional_embedding", SAME),
    ("params/text/ln_final/scale", "ln_final.weight", SAME),
    ("params/text/ln_final/bias", "ln_final.bias", SAME),
    ("params/text/text_projection", "text_projection", SAME),
    # --- contrastive head ---
    ("params/logit_scale", "logit_scale", SAME),
    ("params/logit_bias", "logit_bias", SAME),
]

#: Keys found in checkpoints that carry no weights (OpenAI's metadata, BN step counters, masks).
IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size|attn_mask|.*num_batches_tracked)$")

_PLACEHOLDERS = {  # placeholder -> (clipjax regex, open_clip regex)
    "T": (r"(?P<T>visual/transformer|text/transformer)", None),
    "t": (None, r"(?P<T>visual\.transformer|transformer)"),
    "L": (r"(?P<L>\d+)", r"(?P<L>\d+)"), "S": (r"(?P<S>[1-4])", r"(?P<S>[1-4])"),
    "B": (r"(?P<B>\d+)", r"(?P<B>\d+)"), "n": (r"(?P<n>[1-3])", r"(?P<n>[1-3])"),
}
_PREFIX_J2T = {"visual/transformer": "visual.transformer", "text/transformer": "transformer"}
_PREFIX_T2J = {v: k for k, v in _PREFIX_J2T.items()}


def _pattern(template: str, side: int) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w)\}", template):
        out += re.escape(template[pos:m.start()])
        out += _PLACEHOLDERS[m.group(1)][side]
        pos = m.end()
    return re.compile("^" + out + re.escape(template[pos:]) + "$")


_ROWS = [(_pattern(j, 0), _pattern(t, 1), j, t, tr) for j, t, tr in MAPPING]


def _fill(template: str, groups: Mapping[str, str], to_torch: bool) -> str:
    g = dict(groups)
    if "T" in g:
        g["t" if to_torch else "T"] = _PREFIX_J2T[g["T"]] if to_torch else _PREFIX_T2J[g["T"]]
        if to_torch:
            g.pop("T")
    return re.sub(r"\{(\w)\}", lambda m: g[m.group(1)], template)


def jax_to_torch_name(path: str) -> tuple[str, Transform]:
    """``'params/visual/proj'`` -> ``('visual.proj', transform)``; KeyError if unmapped."""
    for jre, _, _, ttmpl, tr in _ROWS:
        m = jre.match(path)
        if m:
            return _fill(ttmpl, m.groupdict(), True), tr
    raise KeyError(f"No open_clip name for clipjax path {path!r}; add a row to clipjax.convert.MAPPING.")


def torch_to_jax_name(name: str) -> tuple[str, Transform]:
    """``'visual.proj'`` -> ``('params/visual/proj', transform)``; KeyError if unmapped."""
    for _, tre, jtmpl, _, tr in _ROWS:
        m = tre.match(name)
        if m:
            return _fill(jtmpl, m.groupdict(), False), tr
    raise KeyError(f"No clipjax path for open_clip name {name!r}.")


# ----------------------------------------------------------------------------- errors


class ConversionError(ValueError):
    """A checkpoint does not fit the model: lists every missing / mis-shaped / unexpected tensor."""

    def __init__(self, missing=(), mismatched=(), unexpected=(), context=""):
        self.missing, self.mismatched, self.unexpected = list(missing), list(mismatched), list(unexpected)
        lines = [f"Checkpoint does not match the model{(' ' + context) if context else ''}:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}):")
            lines += [f"    {name}  (expected shape {shape})" for name, shape in self.missing]
        if self.mismatched:
            lines.append(f"  wrong shape ({len(self.mismatched)}):")
            lines += [f"    {name}: expected {exp}, got {got}" for name, exp, got in self.mismatched]
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}):")
            lines += [f"    {name}  (shape {shape})" for name, shape in self.unexpected]
        lines.append("  Check --model (or let the architecture be inferred from the checkpoint).")
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- reading checkpoints


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _to_numpy_dict(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        if hasattr(v, "detach"):  # torch tensor
            v = v.detach().cpu()
            v = v.float().numpy() if v.is_floating_point() else v.numpy()
        out[k] = np.asarray(v)
    return out


def _unwrap(sd: Any) -> dict[str, np.ndarray]:
    if isinstance(sd, Mapping):
        for key in ("state_dict", "model", "module"):
            if key in sd and isinstance(sd[key], Mapping) and not hasattr(sd[key], "shape"):
                return _unwrap(sd[key])
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):  # DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Reads an OpenAI / open_clip checkpoint into ``{open_clip name: float32 (or int) ndarray}``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        sd = load_file(path)
    elif _is_torchscript(path):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{path!r} is a TorchScript archive (OpenAI's release format); reading it needs "
                              "torch. Convert it once where torch is installed, or use a state-dict / "
                              ".safetensors checkpoint.") from e
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        try:
            from clipjax import torch_pickle
        except ImportError:
            torch_pickle = None
        if torch_pickle is not None:
            sd = torch_pickle.load_state_dict(path)
        else:  # pragma: no cover - only without clipjax.torch_pickle
            import torch
            sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = _to_numpy_dict(_unwrap(sd))
    return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) or v.dtype.kind == "V" else v)
            for k, v in sd.items()}


# ----------------------------------------------------------------------------- architecture inference


def infer_config(sd: Mapping[str, np.ndarray], quick_gelu: bool = True):
    """Builds the :class:`CLIPConfig` of an OpenAI-layout state dict (ViT or ModifiedResNet)."""
    from clipjax.models.clip import CLIPConfig, TextConfig, VisionConfig

    def count(prefix, pos):
        return len({k.split(".")[pos] for k in sd if k.startswith(prefix)})

    try:
        if "visual.proj" in sd:
            width, _, patch, _ = sd["visual.conv1.weight"].shape
            layers = count("visual.transformer.resblocks.", 3)
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(image_size=patch * grid, layers=layers, width=width, patch_size=patch)
        else:
            layers = tuple(count(f"visual.layer{s}.", 2) for s in (1, 2, 3, 4))
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            out_w = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(image_size=out_w * 32, layers=layers, width=width, patch_size=None)
        t_width = sd["ln_final.weight"].shape[0]
        text = TextConfig(context_length=sd["positional_embedding"].shape[0],
                          vocab_size=sd["token_embedding.weight"].shape[0], width=t_width,
                          heads=t_width // 64, layers=count("transformer.resblocks.", 2))
        bias = float(np.asarray(sd["logit_bias"]).reshape(())) if "logit_bias" in sd else None
        return CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text,
                          quick_gelu=quick_gelu, init_logit_bias=bias).validate()
    except KeyError as e:
        raise ValueError(f"Cannot infer a CLIP architecture: the checkpoint has no {e.args[0]!r}. Is it an "
                         "OpenAI/open_clip CLIP checkpoint? Pass --model explicitly.") from None


def find_model_name(config) -> Optional[str]:
    """The registry name whose config equals ``config`` (ignoring logit inits), or None."""
    from clipjax.models.registry import MODEL_CONFIGS
    for name, cfg in MODEL_CONFIGS.items():
        if dataclasses.replace(cfg, init_logit_bias=config.init_logit_bias,
                               init_logit_scale=config.init_logit_scale) == config:
            return name
    return None


# ----------------------------------------------------------------------------- conversion


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def _unflatten(flat):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def variable_shapes(model) -> dict[str, tuple]:
    """``{clipjax path: shape}`` of ``model``'s variables in the unscanned layout (no compute)."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from clipjax.models.layers import unstack_layers

    cfg = model.config
    s = cfg.vision.image_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3), jnp.float32),
                                               jnp.zeros((1, cfg.text.context_length), jnp.int32)))
    shapes = unstack_layers(nn.meta.unbox(dict(shapes)))
    return {k: tuple(v.shape) for k, v in _flatten(shapes).items()}


def torch_to_clipjax(sd: Mapping[str, np.ndarray], model, dtype=np.float32) -> dict:
    """open_clip state dict -> clipjax variables (``params`` [+ ``batch_stats``]) for ``model``.

    The result is laid out for ``model.scan`` (stacked layers when scanned). Raises
    :class:`ConversionError` listing every missing, mis-shaped and unexpected tensor at once.
    """
    from clipjax.models.layers import stack_layers

    expected = variable_shapes(model)
    flat, missing, mismatched, used = {}, [], [], set()
    for path, shape in expected.items():
        name, tr = jax_to_torch_name(path)
        if name not in sd:
            missing.append((name, shape))
            continue
        used.add(name)
        src = np.asarray(sd[name])
        try:
            arr = tr.to_jax(src, shape)
        except ValueError:
            arr = None
        if arr is None or arr.shape != shape:
            torch_shape = tuple(tr.to_torch(np.zeros(shape, np.float32)).shape)
            mismatched.append((name, torch_shape, tuple(src.shape)))
            continue
        flat[path] = arr.astype(dtype) if np.issubdtype(arr.dtype, np.floating) else arr
    unexpected = [(k, tuple(np.shape(v))) for k, v in sd.items() if k not in used and not IGNORED.match(k)]
    if missing or mismatched or unexpected:
        raise ConversionError(missing, mismatched, unexpected)
    variables = _unflatten(flat)
    return stack_layers(variables) if getattr(model, "scan", False) else variables


def clipjax_to_torch(variables: Mapping) -> dict[str, np.ndarray]:
    """clipjax variables (boxed or not, scanned or not) -> open_clip state dict of numpy arrays.

    BatchNorm ``num_batches_tracked`` counters (which open_clip's strict loading requires) are
    added as int64 zeros.
    """
    import flax.linen as nn
    from clipjax.models.layers import unstack_layers

    flat = _flatten(unstack_layers(nn.meta.unbox(dict(variables))))
    sd: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        name, tr = jax_to_torch_name(path)
        sd[name] = np.ascontiguousarray(tr.to_torch(np.asarray(value, np.float32)))
        if name.endswith(".running_mean"):
            sd[name[:-len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return sd


# ----------------------------------------------------------------------------- files


def save_clipjax(path: str, variables: Mapping, config, model_name: str = "") -> None:
    """Writes the clipjax ``.msgpack`` format (see module docstring)."""
    import flax.linen as nn
    from flax import serialization
    from clipjax.models.layers import unstack_layers
    import jax

    variables = jax.tree_util.tree_map(np.asarray, unstack_layers(nn.meta.unbox(dict(variables))))
    blob = {"format": "clipjax-v1", "model": model_name or "", "config": json.dumps(config.to_dict()),
            "variables": variables}
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(blob))


def load_clipjax(path: str):
    """Reads a clipjax ``.msgpack`` file -> ``(config, variables, model_name)`` (unscanned layout)."""
    from flax import serialization
    from clipjax.models.clip import CLIPConfig

    with open(path, "rb") as f:
        blob = serialization.msgpack_restore(f.read())
    if not isinstance(blob, dict) or blob.get("format") != "clipjax-v1":
        raise ValueError(f"{path!r} is not a clipjax-v1 msgpack file (written by clipjax.convert).")
    return CLIPConfig.from_dict(json.loads(blob["config"])), blob["variables"], blob.get("model") or None


def save_open_clip(path: str, variables: Mapping) -> dict[str, np.ndarray]:
    """Exports clipjax variables as an open_clip ``.safetensors`` state dict; returns the dict."""
    from safetensors.numpy import save_file

    sd = clipjax_to_torch(variables)
    save_file(sd, path)
    return sd


def convert_file(src: str, dst: str, model_name: Optional[str] = None, to: Optional[str] = None,
                 quick_gelu: Optional[bool] = None) -> str:
    """File-to-file conversion; returns a one-line summary. See the module docstring."""
    from clipjax.models.registry import create_model

    clipjax_ext = (".msgpack",)
    if to is None:
        if dst.endswith(clipjax_ext):
            to = "clipjax"
        elif dst.endswith(".safetensors") and src.endswith(clipjax_ext):
            to = "open_clip"
        else:
            raise ValueError(f"Cannot tell the direction from {src!r} -> {dst!r}; use a .msgpack destination "
                             "(-> clipjax) or a .msgpack source with a .safetensors destination (-> open_clip), "
                             "or pass --to=clipjax|open_clip.")
    if to == "clipjax":
        sd = read_checkpoint(src)
        if model_name:
            model = create_model(model_name)
            if quick_gelu is not None:
                model = create_model(model_name, quick_gelu=quick_gelu)
            config = model.config
        else:
            # OpenAI's TorchScript release was trained with QuickGELU; open_clip state dicts say nothing.
            qg = _is_torchscript(src) if quick_gelu is None else quick_gelu
            config = infer_config(sd, quick_gelu=qg)
            model_name = find_model_name(config) or ""
            from clipjax.models.clip import CLIP
            model = CLIP(config)
        variables = torch_to_clipjax(sd, model)
        save_clipjax(dst, variables, config, model_name or "")
        n = sum(int(np.prod(np.shape(v))) for v in _flatten(variables).values())
        return f"{src} -> {dst}: clipjax {model_name or 'custom'} ({n:,} values, quick_gelu={config.quick_gelu})"
    if to == "open_clip":
        if src.endswith(clipjax_ext):
            config, variables, stored_name = load_clipjax(src)
        else:
            raise ValueError(f"--to=open_clip needs a clipjax .msgpack source, got {src!r}.")
        if model_name and stored_name and model_name != stored_name:
            raise ValueError(f"--model={model_name} but {src!r} holds {stored_name}.")
        from clipjax.models.clip import CLIP
        expected = variable_shapes(CLIP(config))
        got = {k: tuple(np.shape(v)) for k, v in _flatten(variables).items()}
        bad = [(k, s, got[k]) for k, s in expected.items() if k in got and got[k] != s]
        if bad or set(expected) != set(got):
            raise ConversionError([(k, s) for k, s in expected.items() if k not in got], bad,
                                  [(k, s) for k, s in got.items() if k not in expected], context=f"in {src}")
        sd = save_open_clip(dst, variables)
        return f"{src} -> {dst}: open_clip state dict ({len(sd)} tensors)"
    raise ValueError(f"--to must be 'clipjax' or 'open_clip', got {to!r}.")


def main(argv):
    from absl import flags
    del argv
    f = flags.FLAGS
    print(convert_file(f.src, f.dst, f.model or None, f.to or None,
                       None if f.quick_gelu is None else f.quick_gelu))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("src", None, "Source checkpoint (.pt/.pth/.bin/.safetensors or clipjax .msgpack).")
    flags.DEFINE_string("dst", None, "Destination (.msgpack for clipjax, .safetensors for open_clip).")
    flags.DEFINE_string("model", None, "Registry name (clipjax.models.list_models()); inferred if omitted.")
    flags.DEFINE_enum("to", None, ["clipjax", "open_clip"], "Direction; default from the file extensions.")
    flags.DEFINE_bool("quick_gelu", None, "Override the activation (default: True for OpenAI TorchScript "
                      "files when inferring, else the registry's).")
    flags.mark_flags_as_required(["src", "dst"])
    app.run(main)
