"""OpenAI ``dall_e`` dVAE weights <-> dallejax params.

Sources:
  * OpenAI's released ``encoder.pkl`` / ``decoder.pkl`` (``torch.save`` of whole ``nn.Module``
    objects) and ``torch.save``-d state dicts, read **without torch** through
    :mod:`clipjax.torch_pickle` (the module classes become inert placeholders);
  * live ``dall_e`` Encoder/Decoder objects (or any ``{name: tensor}`` state dict), duck-typed:
    this module never imports torch itself.

Outputs: flax variables ``{'params': ...}`` for :class:`dallejax.dvae.Encoder` /
:class:`dallejax.dvae.Decoder`, saved as ``.msgpack`` (flax serialization) or ``.safetensors``
with the model config alongside.

CLI::

    python -m dallejax.convert --src encoder.pkl --dst encoder.msgpack
    python -m dallejax.convert --src decoder.pkl --dst decoder.safetensors
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from clipjax import torch_pickle

__all__ = [
    "NAME_TABLE", "torch_to_params", "params_to_torch", "infer_kind", "config_from_state_dict",
    "from_torch_module", "load_openai", "save_params", "load_params", "build_model",
    "dvae_variables",
]

# --------------------------------------------------------------------------- name mapping
# One table for both the encoder and the decoder (they share the layout). {p}/{t}: the
# parameter, ``kernel`` <-> ``w`` (torch OIHW <-> flax HWIO) and ``bias`` <-> ``b``.
#
#   dallejax (flax path)                 dall_e (torch state_dict name)
NAME_TABLE = (
    ("input/{p}",                         "blocks.input.{t}"),
    ("group_{g}/block_{i}/skip/{p}",      "blocks.group_{g}.block_{i}.id_path.{t}"),
    ("group_{g}/block_{i}/conv_{k}/{p}",  "blocks.group_{g}.block_{i}.res_path.conv_{k}.{t}"),
    ("output/{p}",                        "blocks.output.conv.{t}"),
)
_PARAM_NAMES = {"kernel": "w", "bias": "b"}


def _template_regex(template: str) -> re.Pattern:
    out = re.escape(template)
    for field in ("g", "i", "k"):
        out = out.replace(re.escape("{" + field + "}"), f"(?P<{field}>[0-9]+)")
    out = out.replace(re.escape("{p}"), "(?P<p>kernel|bias)").replace(re.escape("{t}"), "(?P<t>w|b)")
    return re.compile(out + r"\Z")


_TORCH_TO_OURS = [(_template_regex(t), o) for o, t in NAME_TABLE]
_OURS_TO_TORCH = [(_template_regex(o), t) for o, t in NAME_TABLE]


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor, duck-typed (torch is never imported here)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def torch_to_params(state_dict: Mapping[str, Any]) -> dict:
    """dall_e ``Encoder``/``Decoder`` state dict -> flax params tree (without ``'params'``).

    Raises ValueError naming any key that is not in :data:`NAME_TABLE`.
    """
    params: dict = {}
    unknown = []
    for name, value in state_dict.items():
        for regex, ours in _TORCH_TO_OURS:
            m = regex.match(name)
            if m:
                fields = m.groupdict()
                p = "kernel" if fields.pop("t") == "w" else "bias"
                path = ours.format(p=p, **fields).split("/")
                arr = _to_numpy(value)
                if p == "kernel":
                    if arr.ndim != 4:
                        raise ValueError(f"{name}: expected a 4-d conv weight, got {arr.shape}")
                    arr = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))  # OIHW -> HWIO
                node = params
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = arr
                break
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unrecognised dall_e parameter names {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}; expected names like those in "
                         "dallejax.convert.NAME_TABLE (a dall_e Encoder/Decoder state dict)")
    return params


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        keys = path.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


def _plain(params) -> dict:
    """Unboxes flax ``Partitioned`` leaves and strips an outer ``{'params': ...}``."""
    try:
        from flax.core import meta
        params = meta.unbox(params)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return params


def params_to_torch(params) -> "collections.OrderedDict[str, np.ndarray]":
    """Inverse of :func:`torch_to_params`: flax params -> dall_e state dict (numpy, OIHW)."""
    out = collections.OrderedDict()
    for path, value in _flatten(_plain(params)).items():
        for regex, theirs in _OURS_TO_TORCH:
            m = regex.match(path)
            if m:
                fields = m.groupdict()
                p = fields.pop("p")
                arr = np.asarray(value)
                if p == "kernel":
                    arr = np.ascontiguousarray(arr.transpose(3, 2, 0, 1))  # HWIO -> OIHW
                out[theirs.format(t=_PARAM_NAMES[p], **fields)] = arr
                break
        else:
            raise ValueError(f"parameter {path!r} has no dall_e name in NAME_TABLE")
    return out


# --------------------------------------------------------------------------- configs
def infer_kind(state_dict: Mapping[str, Any]) -> str:
    """'encoder' (7x7 input conv from pixels) or 'decoder' (1x1 input conv from the codes)."""
    if "blocks.input.w" not in state_dict:
        raise ValueError("not a dall_e Encoder/Decoder state dict: no 'blocks.input.w'")
    kh = np.shape(state_dict["blocks.input.w"])[-1]
    return "decoder" if kh == 1 else "encoder"


def config_from_state_dict(state_dict: Mapping[str, Any], kind: str | None = None) -> dict:
    """Architecture fields of :class:`Encoder` / :class:`Decoder` read off the weight shapes."""
    kind = kind or infer_kind(state_dict)
    shape = lambda name: tuple(np.shape(state_dict[name]))
    groups = sorted({int(m.group(1)) for n in state_dict
                     if (m := re.match(r"blocks\.group_(\d+)\.", n))})
    blocks = sorted({int(m.group(1)) for n in state_dict
                     if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", n))})
    if not groups or not blocks:
        raise ValueError("state dict has no 'blocks.group_*.block_*' parameters")
    cfg = dict(group_count=len(groups), n_blk_per_group=len(blocks))
    in_w, out_w = shape("blocks.input.w"), shape("blocks.output.conv.w")
    if kind == "encoder":
        cfg.update(n_hid=in_w[0], input_channels=in_w[1], vocab_size=out_w[0])
    elif kind == "decoder":
        cfg.update(n_init=in_w[0], vocab_size=in_w[1], n_hid=out_w[1], output_channels=out_w[0] // 2)
    else:
        raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")
    return cfg


def build_model(kind: str, config: Mapping[str, Any], **overrides):
    """The flax module for ``kind`` with ``config`` (+ ``dtype=`` etc. overrides)."""
    from dallejax import dvae
    cls = {"encoder": dvae.Encoder, "decoder": dvae.Decoder}[kind]
    return cls(**dict(config), **overrides)


def dvae_variables(encoder_params, decoder_params) -> dict:
    """Combines converted encoder and decoder params into :class:`dallejax.dvae.DVAE` variables."""
    return {"params": {"encoder": _plain(encoder_params), "decoder": _plain(decoder_params)}}


# --------------------------------------------------------------------------- loading
def from_torch_module(module) -> tuple[str, dict, dict]:
    """A live dall_e Encoder/Decoder (or its state dict) -> ``(kind, config, {'params': ...})``."""
    sd = module.state_dict() if hasattr(module, "state_dict") else module
    sd = collections.OrderedDict((k, _to_numpy(v)) for k, v in sd.items())
    kind = infer_kind(sd)
    return kind, config_from_state_dict(sd, kind), {"params": torch_to_params(sd)}


def load_openai(path: str | os.PathLike) -> tuple[str, dict, dict]:
    """OpenAI ``encoder.pkl`` / ``decoder.pkl`` (or a torch.save-d state dict), torch-free.

    Returns ``(kind, config, {'params': ...})``. Pickled ``dall_e`` module classes are replaced
    by inert placeholders (see :mod:`clipjax.torch_pickle`); any other global is refused.
    """
    obj = torch_pickle.load_torch_file(path, allow_modules=True)
    if isinstance(obj, torch_pickle.TorchModule):
        if not obj.torch_class.startswith("dall_e."):
            raise ValueError(f"{path}: pickled module is a {obj.torch_class}, not a dall_e "
                             "Encoder/Decoder")
    return from_torch_module(torch_pickle.state_dict(obj))


# --------------------------------------------------------------------------- saving
def save_params(variables, path: str | os.PathLike, kind: str, config: Mapping[str, Any]) -> None:
    """Writes ``variables`` (``{'params': ...}``) to ``.msgpack`` or ``.safetensors``, with the
    ``kind`` and ``config`` needed to rebuild the module (:func:`load_params`)."""
    path = os.fspath(path)
    params = {k: np.asarray(v) for k, v in _flatten(_plain(variables)).items()}
    meta = {"kind": kind, "config": json.dumps(dict(config), sort_keys=True)}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file(params, path, metadata=meta)
    elif path.endswith(".msgpack"):
        from flax import serialization
        blob = serialization.msgpack_serialize({"params": _unflatten(params), "meta": meta})
        with open(path, "wb") as f:
            f.write(blob)
    else:
        raise ValueError(f"unknown output format for {path!r}: use a .msgpack or .safetensors name")


def load_params(path: str | os.PathLike) -> tuple[str, dict, dict]:
    """Reads a file written by :func:`save_params` -> ``(kind, config, {'params': ...})``."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            params = _unflatten({k: f.get_tensor(k) for k in f.keys()})
    elif path.endswith(".msgpack"):
        from flax import serialization
        with open(path, "rb") as f:
            blob = serialization.msgpack_restore(f.read())
        params, meta = blob["params"], blob.get("meta", {})
    else:
        raise ValueError(f"unknown params format for {path!r}: expected .msgpack or .safetensors")
    if "kind" not in meta:
        raise ValueError(f"{path}: missing 'kind' metadata; was it written by dallejax.convert?")
    return meta["kind"], json.loads(meta["config"]), {"params": params}


# --------------------------------------------------------------------------- CLI
def main(argv):
    from absl import flags
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.src or not FLAGS.dst:
        raise SystemExit("both --src and --dst are required")
    try:
        kind, config, variables = load_openai(FLAGS.src)
    except (OSError, ValueError, torch_pickle.UnsafePickleError) as e:
        raise SystemExit(f"cannot convert {FLAGS.src}: {e}") from None
    if FLAGS.kind and FLAGS.kind != kind:
        raise SystemExit(f"--kind={FLAGS.kind} but {FLAGS.src} holds a dall_e {kind}")
    save_params(variables, FLAGS.dst, kind, config)
    n = sum(np.size(v) for v in _flatten(variables["params"]).values())
    print(f"{FLAGS.src}: dall_e {kind} {config} ({n:,} parameters) -> {FLAGS.dst}")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("src", None, "OpenAI encoder.pkl/decoder.pkl or a torch.save-d dall_e state dict")
    flags.DEFINE_string("dst", None, "output .msgpack or .safetensors")
    flags.DEFINE_enum("kind", None, ["encoder", "decoder"], "optional check of the model kind")
    app.run(main)
