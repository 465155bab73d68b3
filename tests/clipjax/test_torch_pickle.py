"""clipjax.torch_pickle: torch-free, restricted loading of torch.save files."""
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import ml_dtypes
import numpy as np
import pytest

from clipjax import torch_pickle
from clipjax.torch_pickle import UnsafePickleError, load_torch_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- malicious files
class _Exploit:
    """Unpickling this runs ``func(arg)`` with plain pickle."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker):
    cmd = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return {"os.system": _Exploit(os.system, cmd), "builtins.exec": _Exploit(exec, code)}


def _write_zip(path, obj, archive="archive"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{archive}/data.pkl", pickle.dumps(obj, protocol=2))
        zf.writestr(f"{archive}/byteorder", "little")
        zf.writestr(f"{archive}/version", "3\n")


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("layout", ["zip_top", "zip_nested", "legacy_stream"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, layout):
    marker = tmp_path / "marker"
    exploit = _payloads(marker)[payload]
    path = tmp_path / "evil.pt"
    if layout == "zip_top":
        _write_zip(path, exploit)
    elif layout == "zip_nested":  # hidden inside an otherwise plain state dict
        _write_zip(path, {"weight": [1.0, 2.0], "extra": {"x": exploit}})
    else:  # legacy stream: the very first pickle is the exploit
        path.write_bytes(pickle.dumps(exploit, protocol=2))
    with pytest.raises(UnsafePickleError) as err:
        load_torch_file(path)
    msg = str(err.value)
    # Names the refused callable (os.system pickles as posix.system / nt.system) and the opt-in.
    expected = {"os.system": ("posix.system", "nt.system"), "builtins.exec": ("builtins.exec",)}
    assert any(name in msg for name in expected[payload]), msg
    assert "extra_globals" in msg and "allow-list" in msg
    assert not marker.exists()
    # Also refused when module placeholders are enabled.
    with pytest.raises(UnsafePickleError):
        load_torch_file(path, allow_modules=True)
    assert not marker.exists()


def test_crafted_payload_really_is_an_exploit(tmp_path):
    """Control: plain pickle does run the payload, so the refusal test above is meaningful."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    _write_zip(path, _payloads(marker)["builtins.exec"])
    code = (f"import pickle, zipfile; pickle.loads(zipfile.ZipFile({str(path)!r})"
            ".read('archive/data.pkl'))")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert marker.exists()


def test_unknown_persistent_id_and_non_torch_file_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="neither a torch.save zip archive nor a legacy"):
        load_torch_file(bad)
    empty_zip = tmp_path / "x.zip"
    with zipfile.ZipFile(empty_zip, "w") as zf:
        zf.writestr("foo.txt", "hi")
    with pytest.raises(ValueError, match="data.pkl"):
        load_torch_file(empty_zip)


def test_extra_globals_opt_in(tmp_path):
    """An explicitly mapped global resolves to the caller's callable; nothing is imported."""
    path = tmp_path / "x.pt"
    # A pickle that calls a harmless-looking but non-allow-listed global: fractions.Fraction.
    import fractions
    _write_zip(path, {"frac": fractions.Fraction(1, 3)})
    with pytest.raises(UnsafePickleError, match="fractions.Fraction"):
        load_torch_file(path)
    out = load_torch_file(path, extra_globals={"fractions.Fraction": lambda *a: ("frac",) + a})
    assert out["frac"] == ("frac", 1, 3)


# ----------------------------------------------------------------------------- torch files
def _torch():
    import torch as t
    return t


def _reference_state_dict():
    t = _torch()
    g = t.Generator().manual_seed(0)
    base = t.randn(6, 5, generator=g)
    shared = t.arange(40, dtype=t.int64)
    return {
        "f32": t.randn(3, 4, generator=g),
        "f32_transposed": base.t(),                         # non-contiguous strides
        "f32_sliced": base[1:5:2, 1:],                      # offset + strides
        "f16": t.randn(7, generator=g).half(),
        "bf16": t.randn(2, 3, generator=g).to(t.bfloat16),
        "f64": t.randn(2, 2, generator=g, dtype=t.float64),
        "i64_view_a": shared[3:13],                         # two views of one storage
        "i64_view_b": shared.view(5, 8)[:, ::3],
        "i32": t.arange(6, dtype=t.int32).view(2, 3),
        "i8": t.tensor([-3, 4, 127], dtype=t.int8),
        "u8": t.tensor([0, 255, 7], dtype=t.uint8),
        "bool": t.tensor([True, False, True]),
        "scalar": t.tensor(3.5),
        "empty": t.zeros(0, 4),
        "expanded": t.randn(3, 1, generator=g).expand(3, 4),  # stride 0
        "param": t.nn.Parameter(t.randn(4, generator=g)),
        "nested": {"list": [t.ones(2), 5, "text"], "tuple": (t.zeros(1), 1.5)},
    }


def _as_numpy(x):
    t = _torch()
    if isinstance(x, t.Tensor):
        x = x.detach()
        if x.dtype == t.bfloat16:
            return x.view(t.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return x


def _assert_same(ours, ref, path="root"):
    t = _torch()
    if isinstance(ref, t.Tensor):
        ref_np = _as_numpy(ref)
        assert isinstance(ours, np.ndarray), path
        assert ours.dtype == ref_np.dtype, (path, ours.dtype, ref_np.dtype)
        assert ours.shape == ref_np.shape, (path, ours.shape, ref_np.shape)
        np.testing.assert_array_equal(ours.view(np.uint8) if ours.dtype == ml_dtypes.bfloat16 else ours,
                                      ref_np.view(np.uint8) if ref_np.dtype == ml_dtypes.bfloat16 else ref_np,
                                      err_msg=path)
        assert ours.flags.c_contiguous and ours.flags.writeable and ours.flags.owndata, path
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and list(ours) == list(ref), path
        for k in ref:
            _assert_same(ours[k], ref[k], f"{path}.{k}")
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref), path
        for i, (a, b) in enumerate(zip(ours, ref)):
            _assert_same(a, b, f"{path}[{i}]")
    else:
        assert ours == ref, path


@pytest.mark.parity
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_state_dict_matches_torch(tmp_path, zip_format):
    t = _torch()
    ref = _reference_state_dict()
    path = tmp_path / "sd.pt"
    t.save(ref, path, _use_new_zipfile_serialization=zip_format)
    ours = load_torch_file(path)
    _assert_same(ours, ref)
    # The same through torch's own loader, to be sure the file round-trips there too.
    _assert_same(ours, t.load(path, weights_only=True))


@pytest.mark.parity
def test_ordered_state_dict_of_module(tmp_path):
    t = _torch()
    net = t.nn.Sequential(t.nn.Conv2d(3, 4, 3), t.nn.BatchNorm2d(4), t.nn.Linear(4, 2))
    t.save(net.state_dict(), tmp_path / "m.pt")
    ours = torch_pickle.load_state_dict(tmp_path / "m.pt")
    ref = net.state_dict()
    assert list(ours) == list(ref)  # includes BatchNorm buffers (num_batches_tracked int64)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k].numpy())


@pytest.mark.parity
def test_truncated_storage_is_reported(tmp_path):
    t = _torch()
    src, dst = tmp_path / "ok.pt", tmp_path / "bad.pt"
    t.save({"w": t.randn(100)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data/0"):
                data = data[:40]
            zout.writestr(item, data)
    with pytest.raises(ValueError, match="storage 0 has 40 bytes"):
        load_torch_file(dst)


_SUBPROCESS_MODULE_LOAD = textwrap.dedent("""
    import sys, numpy as np
    from clipjax import torch_pickle
    try:
        torch_pickle.load_torch_file(sys.argv[1])
        raise SystemExit("module pickle loaded without allow_modules")
    except torch_pickle.UnsafePickleError as e:
        assert "allow_modules=True" in str(e) and "dall_e.encoder.Encoder" in str(e), e
    module = torch_pickle.load_torch_file(sys.argv[1], allow_modules=True)
    assert module.torch_class == "dall_e.encoder.Encoder", module.torch_class
    assert module.n_hid == 64 and module.vocab_size == 512
    np.savez(sys.argv[2], **torch_pickle.state_dict(module))
    assert "torch" not in sys.modules and "dall_e" not in sys.modules, sorted(
        m for m in sys.modules if m.split(".")[0] in ("torch", "dall_e"))
    print("OK torch-free")
""")


@pytest.mark.parity
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_dall_e_module_loads_without_torch(tmp_path, zip_format):
    t = _torch()
    from dall_e import Encoder
    t.manual_seed(0)
    enc = Encoder(n_hid=64, vocab_size=512)
    path = tmp_path / "encoder.pkl"
    t.save(enc, path, _use_new_zipfile_serialization=zip_format)  # as OpenAI saved theirs
    out = tmp_path / "sd.npz"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS_MODULE_LOAD, str(path), str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "OK torch-free" in proc.stdout
    ours = np.load(out)
    ref = enc.state_dict()
    assert list(ours.keys()) == list(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k].numpy())


@pytest.mark.parity
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive_parameters(tmp_path, how):
    """torch.jit.save archives (OpenAI CLIP .pt style): parameters read, code never run."""
    t = _torch()
    t.manual_seed(0)
    net = t.nn.Sequential(t.nn.Conv2d(3, 4, 3), t.nn.BatchNorm2d(4),
                          t.nn.Sequential(t.nn.Flatten(), t.nn.Linear(64, 2)))
    net[1].running_mean.uniform_()
    if how == "script":  # fp16 weights, as in OpenAI's CLIP archives
        scripted = t.jit.script(net.half())
    else:
        scripted = t.jit.trace(net, t.randn(1, 3, 6, 6))
    path = tmp_path / "ts.pt"
    scripted.save(str(path))
    with pytest.raises(UnsafePickleError, match="TorchScript archive.*allow_modules=True"):
        load_torch_file(path)
    module = load_torch_file(path, allow_modules=True)
    assert module.torch_class.startswith("__torch__.") and module.is_torchscript
    ours, ref = torch_pickle.state_dict(module), scripted.state_dict()
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], _as_numpy(ref[k]), err_msg=k)
