"""dVAE training through the shared trainer on digits: a short run improves held-out PSNR and
keeps the codebook in use (the CI-sized version of the 10-minute digits run)."""
import jax
import pytest

from clipjax import trainer
from configs.dvae import digits
from dallejax.train_dvae import dvae_task


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    c = digits.get_config()
    c.total_steps, c.optim.warmup_steps = 120, 10
    c.loss.kl_weight_steps, c.loss.temperature_steps = 60, 120
    c.train.eval_every, c.train.progress_bar = 0, False
    c.checkpoint.every_steps = 0
    c.eval.num_images = 128
    task = dvae_task(c)
    t = trainer.Trainer(task, c)
    state0 = t.init_state()
    before = task.evaluators["recon"](state0.eval_params(), state0.model_state, 0)
    res = trainer.train(task, c, str(tmp_path_factory.mktemp("dvae")))
    return before, res


def test_short_run_improves_psnr(run):
    before, res = run
    after = res.eval_metrics
    # Measured: 7.9 dB at init -> 10.9 dB after 120 steps (hard argmax codes, EMA params).
    assert after["recon/psnr"] > before["psnr"] + 2.0, (before, after)
    assert after["recon/psnr"] > 10.0


def test_codebook_stays_in_use(run):
    _, res = run
    # 128 images x 64 positions over 256 codes; a collapsed codebook uses a handful.
    assert res.eval_metrics["recon/codebook_usage"] >= 0.05, res.eval_metrics
    assert res.eval_metrics["recon/perplexity"] >= 4.0
