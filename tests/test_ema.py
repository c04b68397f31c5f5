"""`optim.ema_decay`: each stage trains, then scores, saves and caches an exponential moving average
of its weights (Lightning's EMAWeightAveraging, stackwise/pipeline/trainers.py `ema_callbacks`)."""

from __future__ import annotations

import copy
import dataclasses
import signal

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from stackwise import artifacts as art
from stackwise.errors import ConfigError
from stackwise.pipeline import Pipeline
from stackwise.pipeline.trainers import ema_callbacks
from stackwise.stages.full import FullModelStage
from tests.cli_runner import CliRun
from tests.conftest import TINY, cli, cli_env

if not hasattr(L.pytorch.callbacks, "EMAWeightAveraging"):  # lightning < 2.6: refused in one line instead
    pytest.skip("EMAWeightAveraging needs lightning >= 2.6", allow_module_level=True)


class Trajectory(L.Callback):
    """The trained tensors after every optimizer step."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.states.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})


def _fit(module, batches, callbacks):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))


def _batches(cfg, n: int) -> list[dict]:
    torch.manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(2, cfg.vocab_size - 2, (4, 16))
        mask = torch.rand(4, 16) < 0.5
        mask[:, 0] = True
        inputs = ids.masked_fill(mask, cfg.mask_id)
        batches.append({"ids": inputs, "targets": ids, "mask": mask, "t": torch.full((4,), 0.5)})
    return batches


@pytest.mark.parametrize("warmup", [False, True])
def test_the_stage_ends_with_the_average_of_its_weights(make_run, warmup):
    """The weights a stage leaves are d_n * average + (1 - d_n) * weights, updated after every step
    from the first (computed here by hand from the trajectory of the same training): d_n = decay, or
    with the warm-up min(decay, (1 + n) / (10 + n)) after n averaged steps."""
    run = make_run()
    cfg, decay = run.model, 0.7
    batches = _batches(cfg, 6)
    module = FullModelStage(cfg, run.optim_for("e2e"), "mean", len(batches), "e2e")
    twin = copy.deepcopy(module)

    trajectory = Trajectory()
    _fit(module, batches, [trajectory])
    average = dict(trajectory.states[0])
    for n, state in enumerate(trajectory.states[1:], start=1):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        average = {k: d * average[k] + (1 - d) * state[k] for k in average}

    optim = dataclasses.replace(run.optim_for("e2e"), ema_decay=decay, ema_warmup=warmup)
    _fit(twin, batches, ema_callbacks(optim, sharded=False))
    got = {n: p.detach() for n, p in twin.named_parameters() if p.requires_grad}
    assert got.keys() == average.keys()
    for name, want in average.items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(want, trajectory.states[-1][name]) or want.abs().sum() == 0, name


def test_the_warmup_follows_the_recent_weights_more_closely(make_run):
    """After a few steps at decay 0.999, the warmed-up average sits much nearer the last weights than
    the plain one, which is almost the first step's weights (0.999^5)."""
    run = make_run()
    batches = _batches(run.model, 6)
    module = FullModelStage(run.model, run.optim_for("e2e"), "mean", len(batches), "e2e")
    trajectory = Trajectory()
    _fit(copy.deepcopy(module), batches, [trajectory])
    dist = {}
    for warmup in (False, True):
        twin = copy.deepcopy(module)
        optim = dataclasses.replace(run.optim_for("e2e"), ema_decay=0.999, ema_warmup=warmup)
        _fit(twin, batches, ema_callbacks(optim, sharded=False))
        last = trajectory.states[-1]
        dist[warmup] = sum(float((p.detach() - last[n]).norm()) for n, p in twin.named_parameters() if n in last)
    assert dist[True] < 0.5 * dist[False], dist


def test_an_averaged_run_is_consistent_and_resumes_bit_identically(tmp_path, make_run):
    """stage=all with EMA: the fusion check holds (the caches hold the averaged layers' outputs); a
    stage killed after a mid-stage checkpoint and rerun saves the same bytes as one never stopped."""
    args = ["optim.ema_decay=0.8", "trainer.val_check_interval=4", "fusion.finetune_steps=4", "logger=none"]
    ref = Pipeline(make_run(*args, "stage=all", name="ref"))
    ref.execute()  # the fusion check would stop it if caches and layer files disagreed
    plain = Pipeline(make_run("stage=embed", name="plain"))
    plain.execute()
    assert art.sha256_file(plain.paths.layer_ckpt(1)) != art.sha256_file(ref.paths.layer_ckpt(1))

    run_args = ["stage=all", "name=crash", *TINY, "callbacks=none", *args]
    out = CliRun(run_args, tmp_path, cli_env(), timeout=300, kill_at="train:embed:6").wait()
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    out = cli(*run_args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    exp = art.ExperimentPaths(tmp_path / "outputs" / "crash")
    assert {r["stage"]: r.get("resumed_from_step") for r in art.read_results(exp)}["embed"] == 4
    for k in (1, 2):
        assert art.sha256_file(exp.layer_ckpt(k)) == art.sha256_file(ref.paths.layer_ckpt(k)), k


def test_ema_under_fsdp_is_refused_before_any_work(make_run):
    run = make_run("hardware=fsdp", "optim.ema_decay=0.9")
    with pytest.raises(ConfigError, match=r"optim.ema_decay: 0.9 does not run under hardware=fsdp"):
        Pipeline(run).trainers.check_node()
    with pytest.raises(ConfigError, match=r"optim.ema_decay: must be a number in \[0, 1\)"):
        make_run("optim.ema_decay=1.5")
