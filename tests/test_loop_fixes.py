"""Resume and throughput details of the training loop: the random state of ranks that a checkpoint
did not write, resuming under another dist.strategy without a warning, and a compiled run's summary
throughput without the compilation."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from conftest import TINY, read_metrics, run_cli

from pretune.config import Config, load_config
from pretune.config_io import save_config
from pretune.model.config import ModelConfig
from pretune.model.gpt import GPT
from pretune.train import checkpoint as ck
from pretune.train.dist import Runtime


def _tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(preset="tiny", vocab_size=40))


def _draws_after_load(ckpt, rank: int, **kw) -> torch.Tensor:
    """What this process draws (dropout's stream) once `ckpt` is loaded as `rank`."""
    model = _tiny()
    ck.load_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), "cpu", rank, **kw)
    return torch.rand(8)


@pytest.mark.parametrize("sharded", [False, True], ids=["safetensors", "dcp"])
def test_ranks_the_checkpoint_has_no_random_state_for_get_their_own_streams(tmp_path, sharded):
    """A run checkpointed by one process and resumed by three: rank 0 continues the saved stream, and
    ranks 1 and 2 each get another, the same on every resume (they used to copy rank 0's)."""
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    torch.manual_seed(1234)
    saved = torch.get_rng_state()
    if sharded:
        ckpt = ck.save_checkpoint_sharded(tmp_path / "run", 10, model, opt, {"tokens": 1}, 2, Runtime())
    else:
        ckpt = ck.save_checkpoint(tmp_path / "run", 10, model, opt, {"tokens": 1}, 2)
    torch.set_rng_state(saved)
    want0 = torch.rand(8)

    draws = [_draws_after_load(ckpt, rank) for rank in range(3)]
    assert torch.equal(draws[0], want0)  # rank 0: the saved state
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[0])
    assert not torch.equal(draws[1], draws[2])
    assert torch.equal(_draws_after_load(ckpt, 1), draws[1])  # deterministic
    assert not torch.equal(_draws_after_load(ckpt, 1, seed=7), draws[1])  # and a function of the seed


def test_a_checkpoint_of_two_ranks_resumed_on_three_keeps_both_saved_streams(tmp_path):
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    states = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        states.append(ck.rng_state())
    ckpt = ck.save_checkpoint(tmp_path / "run", 4, model, opt, {}, 2, rank_rng=states)
    draws = [_draws_after_load(ckpt, rank) for rank in range(3)]
    for rank in (0, 1):
        ck.set_rng_state(states[rank])
        assert torch.equal(draws[rank], torch.rand(8))
    assert not any(torch.equal(draws[2], d) for d in draws[:2])


def test_resuming_under_another_dist_strategy_is_not_warned_about(tmp_path, capsys):
    from pretune.cli import run_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(Config, None, [f"out_dir={run}", "data.train=corpus.txt", "train.max_steps=20",
                                     "train.stop_after=10"])
    save_config(dataclasses.replace(cfg, resume=None), run / "config.yaml")
    resumed = run_config([f"resume={run}", "dist.strategy=fsdp", "dist.activation_checkpointing=true"])
    assert resumed.dist.strategy == "fsdp"
    assert "warning" not in capsys.readouterr().err  # docs/distributed.md: it resumes and the losses match
    run_config([f"resume={run}", "optim.lr=1e-2"])
    assert "warning: resume with optim.lr=0.01" in capsys.readouterr().err  # other changes still warned


class _SlowFirstCall(torch.nn.Module):
    """Stands for torch.compile: the first call takes COMPILE_S (compiling), the rest run eagerly."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            time.sleep(COMPILE_S)
        return self.inner(*args, **kwargs)


COMPILE_S = 3.0


def test_a_compiled_runs_throughput_leaves_the_compilation_out(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: _SlowFirstCall(module))
    out = tmp_path / "run"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", *TINY, "train.max_steps=6",
                   "train.log_every=3", "train.compile=true") == 0
    summary = json.loads((out / "summary.json").read_text())
    step_tokens = 8 * 32
    assert summary["tokens"] == 6 * step_tokens
    assert summary["compile_s"] >= COMPILE_S > summary["train_s"]
    # over the 5 steps timed, not the one that compiled
    assert summary["tokens_per_s"] * summary["train_s"] == pytest.approx(5 * step_tokens, rel=1e-3)
    assert summary["wall_s"] >= summary["compile_s"] + summary["train_s"] - 1e-3
    first = read_metrics(out)[0]  # its interval's 2 timed steps: with the compilation it was < 3 * 256 / 3 s
    assert first["step"] == 3 and first["tokens_per_s"] > 3 * step_tokens / COMPILE_S


def test_a_nan_evaluation_is_never_the_best_and_never_blocks_a_better_one():
    from pretune.train.best import track_best

    for metric, values in (("val_loss", [float("nan"), 2.0, float("nan"), 1.5]),
                           ("val_accuracy", [float("nan"), 0.5, float("nan"), 0.7])):
        state = {"best": None, "bad_evals": 0}
        kept = []
        for step, v in enumerate(values, 1):
            state["eval"] = {metric: v}
            kept.append(track_best(state, metric, step))
        assert kept == [True, True, False, True] and state["best"]["step"] == 4, (metric, kept)
