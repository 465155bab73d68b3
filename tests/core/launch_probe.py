"""A recording wrapper around a real training entry point, for the launch tests.

    LAUNCH_PROBE_ENTRY=clipjax.train launch/local.sh --entry tests.core.launch_probe ...

runs ``python -m clipjax.train`` unchanged (same flags, same ``cli.train_main``) but records, per
process, in ``WORKDIR/probe/``:

* ``process_{i}.json``: process index and count, the final logged metrics at full precision
  (the console summary rounds to 4 decimals), and for every training step a fingerprint of each
  row of the host-local batch that the task's data iterator yielded (sha1 of the row's bytes,
  per key), so a test can check which rows each process read.
* ``state.npz`` (process 0): every leaf of the final train state, gathered across processes.

``LAUNCH_PROBE_FAIL_PROCESS=i`` makes process ``i`` exit with status 3 once it has joined the
distributed runtime (when the task is loaded), to test what the launcher does with the others.
"""
import hashlib
import importlib
import json
import os
import sys

import numpy as np


def _row_fingerprints(batch: dict) -> dict:
    return {k: [hashlib.sha1(np.ascontiguousarray(row).tobytes()).hexdigest()[:16] for row in np.asarray(v)]
            for k, v in batch.items()}


def main():
    entry = os.environ.get("LAUNCH_PROBE_ENTRY", "")
    if not entry:
        sys.exit("launch_probe: set LAUNCH_PROBE_ENTRY to the entry module to wrap (e.g. clipjax.train)")
    workdir = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")), "")
    if not workdir:
        sys.exit("launch_probe: --workdir=... is required")

    import jax
    from clipjax import trainer

    seen: list = []
    real_load_task, real_train = trainer.load_task, trainer.train

    def load_task(config):
        if os.environ.get("LAUNCH_PROBE_FAIL_PROCESS", "") == str(jax.process_index()):
            print(f"launch_probe: process {jax.process_index()} fails on purpose", file=sys.stderr, flush=True)
            os._exit(3)
        task = real_load_task(config)
        real_data = task.data

        def data(start_step, process_index, process_count):
            for batch in real_data(start_step, process_index, process_count):
                seen.append(_row_fingerprints(batch))
                yield batch
        task.data = data
        return task

    def train(task, config, workdir_, mesh=None):
        result = real_train(task, config, workdir_, mesh=mesh)
        out = os.path.join(workdir_, "probe")
        os.makedirs(out, exist_ok=True)
        record = {"process_index": jax.process_index(), "process_count": jax.process_count(),
                  "local_devices": jax.local_device_count(), "status": result.status,
                  "metrics": {k: float(v) for k, v in result.last_metrics.items()},
                  "start_step": result.start_step, "batches": seen}  # one entry per step taken
        with open(os.path.join(out, f"process_{jax.process_index()}.json"), "w") as f:
            json.dump(record, f)
        leaves = jax.tree.leaves(result.state)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            leaves = multihost_utils.process_allgather(leaves, tiled=True)
        if jax.process_index() == 0:
            np.savez(os.path.join(out, "state.npz"), *[np.asarray(x) for x in leaves])
        return result

    trainer.load_task, trainer.train = load_task, train
    importlib.import_module(entry).run()


if __name__ == "__main__":
    main()
