"""One CLI shape for every entry point:

    python -m <package>.<entry> --config=configs/....py --workdir=DIR --config.key=value ...

User errors (config, data, checkpoint mismatch) end with ONE line on stderr naming the key and
the fix, and exit code 2; SIGTERM preemption saves and exits 0.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from clipjax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "Directory for checkpoints, TensorBoard events and outputs.")

USER_ERRORS = (ConfigError, ValueError, KeyError, FileNotFoundError, AttributeError)


def one_line_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = " ".join(m.strip() for m in msg) if msg else type(e).__name__
    return f"error: {text}"


def _override_error(e: BaseException, argv) -> str:
    """One line for a bad --config.* override (config_flags raises KeyError/AttributeError)."""
    text = str(e)
    m = re.search(r"[A-Za-z_][A-Za-z0-9_]*", text)
    key = m.group(0) if m else "?"
    hint = re.search(r"Did you mean [^?]*\?", text.replace("\\", ""))
    args = [a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].endswith("." + key)]
    where = args[0] if args else "a --config.* override"
    return (f"error: {where}: {key!r} is not a key of the config; check its spelling against the "
            f"config file (overrides can only set existing keys). {hint.group(0) if hint else ''}").rstrip()


def _config_file_error(e: OSError, argv) -> str:
    """config_flags raises OSError when the --config file is missing or fails to load."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
    cause = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
    return f"error: --config={path}: cannot load the config file ({cause})"


def _parse_flags_or_exit(argv):
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        print(_override_error(e, argv), file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        print(one_line_error(e), file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(_config_file_error(e, argv), file=sys.stderr)
        sys.exit(2)


def run_main(main: Callable[[object, str], int | None]) -> None:
    """Parses flags, then calls ``main(config, workdir)``; user errors become one line."""
    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            config = _CONFIG.value
            if config is not None:
                config.get  # a config file that failed to load raises here (config_flags defers it)
        except (KeyError, AttributeError) as e:
            print(_override_error(e, sys.argv), file=sys.stderr)
            return 2
        except OSError as e:
            print(_config_file_error(e, sys.argv), file=sys.stderr)
            return 2
        except (ValueError, TypeError) as e:
            print(one_line_error(e), file=sys.stderr)
            return 2
        if config is None:
            print("error: --config is required (e.g. --config=configs/toy/mlp.py)", file=sys.stderr)
            return 2
        logging.getLogger("absl").setLevel(logging.WARNING)
        try:
            return main(config, _WORKDIR.value) or 0
        except USER_ERRORS as e:
            from clipjax.checkpoint import CheckpointMismatchError
            if isinstance(e, (ConfigError, CheckpointMismatchError)) or getattr(e, "user_error", False):
                print(one_line_error(e), file=sys.stderr)
                return 2
            raise

    app.run(_main, flags_parser=_parse_flags_or_exit)


def train_main(config, workdir: str) -> int:
    """The shared body of every training entry point."""
    import jax
    from clipjax import parallel, trainer

    parallel.maybe_initialize_distributed(config.distributed)
    if "workdir_for_images" in config:  # tasks that write image grids (dVAE, DALL-E) learn the workdir
        with config.unlocked():
            config.workdir_for_images = workdir
    task = trainer.load_task(config)
    result = trainer.train(task, config, workdir)
    if jax.process_index() == 0:
        summary = {**result.last_metrics, **result.eval_metrics}
        keys = [k for k in summary if k.startswith(("loss", "eval", "zero_shot", "linear"))] or list(summary)
        print(f"{result.status} at step {int(jax.device_get(result.state.step))}: "
              + " ".join(f"{k}={summary[k]:.4f}" for k in keys), flush=True)
    return 0
