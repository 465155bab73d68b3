"""Metric output: TensorBoard event files, a console line, and a progress bar with throughput/MFU.

Only process 0 writes; the others stay silent.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Mapping

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device, from vendor datasheets. Used for MFU; override with
# config.train.peak_flops_per_device (e.g. on CPU, where there is no datasheet number).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,   # Trillium
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(override: float = 0.0) -> float:
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return 0.0


class MetricWriter:
    """TensorBoard scalars in ``workdir`` + one console line per log."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._tb = None
        if self.enabled and workdir:
            import tensorflow as tf  # tf.summary writes standard event files
            tf.config.set_visible_devices([], "GPU")
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        if self._tb is not None:
            import tensorflow as tf
            with self._tb.as_default(step=step):
                for k, v in scalars.items():
                    tf.summary.scalar(k, v)
            self._tb.flush()
        line = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(scalars.items()))
        print(f"[step {step}] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4f}"


class Throughput:
    """Samples/s, ETA and MFU over the steps since the last call."""

    def __init__(self, batch_size: int, total_steps: int, flops_per_example: float, peak: float):
        self.batch_size, self.total_steps = batch_size, total_steps
        self.flops_per_example, self.peak = flops_per_example, peak * jax.device_count()
        self._t, self._step = time.perf_counter(), None

    def update(self, step: int) -> dict:
        now = time.perf_counter()
        if self._step is None:
            self._t, self._step = now, step
            return {}
        steps, dt = step - self._step, max(now - self._t, 1e-9)
        self._t, self._step = now, step
        if steps <= 0:
            return {}
        sps = steps * self.batch_size / dt
        out = {"samples_per_sec": sps, "eta_min": (self.total_steps - step) * dt / steps / 60}
        if self.flops_per_example and self.peak:
            out["mfu"] = sps * self.flops_per_example / self.peak
        return out


def to_host(metrics: Mapping[str, jax.Array]) -> dict:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
