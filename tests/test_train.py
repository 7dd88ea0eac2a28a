"""End-to-end runs of the real loop on a tiny preset: files written, exact resume, lineage, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY, read_metrics, run_cli


def test_pretrain_writes_the_run_directory_and_learns(tmp_path, corpus):
    out = tmp_path / "run"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", "train.max_steps=40", *TINY) == 0
    for name in ("config.yaml", "lineage.json", "metrics.jsonl", "summary.json", "tokenizer.json",
                 "model/model.safetensors", "model/config.json", "checkpoints/step-000040/optimizer.pt"):
        assert (out / name).exists(), name
    assert len(list((out / "checkpoints").iterdir())) == 2  # keep_last=2
    summary = json.loads((out / "summary.json").read_text())
    m = read_metrics(out)
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["val_loss"] < m[0]["loss"] - 1.0  # it learned
    assert summary["tokens"] == 40 * 8 * 32 == m[-1]["tokens"]
    for key in ("step", "tokens", "target_tokens", "loss", "lr", "grad_norm", "tokens_per_s", "flops", "wall_s"):
        assert key in m[-1]
    assert "val_bpb" in m[9] and summary["params"] == summary["trainable_params"] > 0
    assert json.loads((out / "lineage.json").read_text())["stage"] == "pretrain"


def test_stop_and_resume_gives_identical_losses(tmp_path, corpus):
    full, part = tmp_path / "full", tmp_path / "part"
    common = [f"data.train={corpus}", "train.max_steps=40", "model.dropout=0.1", *TINY]
    assert run_cli("pretrain", *common, f"out_dir={full}") == 0
    assert run_cli("pretrain", *common, f"out_dir={part}", "train.stop_after=20") == 0
    assert json.loads((part / "summary.json").read_text())["status"] == "stopped"
    assert run_cli("pretrain", f"resume={part}", "train.stop_after=null") == 0
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, 41))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    assert a[-1]["tokens"] == b[-1]["tokens"]


def test_a_stop_between_log_steps_resumes_to_the_same_lines(tmp_path, corpus, capsys):
    """Stopped at step 13 with lines every 4 steps: the interval 13 cut in two goes on in the resumed
    run, a line cut short on disk is dropped, and the saved config neither resumes nor overwrites."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = [f"data.train={corpus}", "train.max_steps=20", *TINY, "train.log_every=4", "train.eval_every=10"]
    assert run_cli("pretrain", *common, f"out_dir={full}") == 0
    assert run_cli("pretrain", *common, f"out_dir={part}", "train.stop_after=13", "overwrite=true") == 0
    assert read_metrics(part)[-1]["step"] == 13 and read_metrics(part)[-1]["interim"] is True
    with open(part / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 14, "loss": 1.2')  # torn by a full disk
    saved_config = (part / "config.yaml").read_text()
    capsys.readouterr()
    # the architecture cannot change on resume: refused before the run is touched
    assert run_cli("pretrain", f"resume={part}", "model.n_layer=3") == 2
    assert "model.n_layer=3 cannot change" in capsys.readouterr().err
    assert (part / "config.yaml").read_text() == saved_config
    # values are compared as resolved (3e-3 is the run's 0.003): no warning for an unchanged one
    assert run_cli("pretrain", f"resume={part}", "train.stop_after=null", "optim.lr=3e-3") == 0
    out = capsys.readouterr()
    assert "dropped 1 unreadable line" in out.out and "warning: resume with" not in out.err
    def steady(run):  # the lines without their timings
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "wall_s")} for r in read_metrics(run)]

    assert steady(part) == steady(full) and [r["step"] for r in read_metrics(part)] == [4, 8, 10, 12, 16, 20]
    import yaml

    saved = yaml.safe_load((part / "config.yaml").read_text())
    assert saved["resume"] is None and saved["overwrite"] is False and saved["out_dir"] == str(part)


def test_resume_after_sigkill_continues_from_last_checkpoint(tmp_path, corpus):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    common = [f"data.train={corpus}", "train.max_steps=300", "train.save_every=25", "train.eval_every=0", *TINY]
    assert run_cli("pretrain", *common, f"out_dir={ref}") == 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pretune", "pretrain", *common, f"out_dir={killed}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= 60 and (killed / "checkpoints" / "step-000050").exists():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    logged = len(metrics.read_text().splitlines())
    last = sorted((killed / "checkpoints").iterdir())[-1].name
    assert run_cli("pretrain", f"resume={killed}") == 0
    a, b = read_metrics(ref), read_metrics(killed)
    assert logged > int(last[5:]) and [r["step"] for r in b] == list(range(1, 301))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_init_from_with_replay_records_lineage(tmp_path, corpus, capsys):
    from conftest import make_corpus

    base, cpt = tmp_path / "base", tmp_path / "cpt"
    domain = make_corpus(tmp_path / "domain.txt", lines=500, seed=9)
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={base}", "train.max_steps=20", *TINY) == 0
    assert run_cli("pretrain", f"init_from={base}", f"data.train=[{domain},{corpus}]", "data.weights=[0.75,0.25]",
                   f"out_dir={cpt}", "train.max_steps=10", *TINY, "model.n_layer=7") == 0
    out = capsys.readouterr().out
    assert "model.n_layer=7 ignored: init_from=" in out  # the parent's architecture
    assert "data.tokenizer='char' ignored: the run keeps the tokenizer of init_from=" in out  # and its tokenizer
    lineage = json.loads((cpt / "lineage.json").read_text())
    assert lineage["stage"] == "cpt" and lineage["parent"] == str(base.resolve())
    assert lineage["parent_lineage"]["stage"] == "pretrain"
    summary = json.loads((cpt / "summary.json").read_text())
    assert summary["stage"] == "cpt"
    # continued pre-training starts from the parent's weights: its first loss is the parent's level
    assert read_metrics(cpt)[0]["loss"] < read_metrics(base)[0]["loss"] - 0.5
    # each source is scored on its own share of the budget, so forgetting of the general text shows
    per_source = {k: summary[k] for k in ("val_bpb/domain.txt", "val_bpb/corpus.txt")}
    assert all(0 < v < 8 for v in per_source.values()) and len(set(per_source.values())) == 2
    assert min(per_source.values()) < summary["val_bpb"] < max(per_source.values())


def test_existing_out_dir_is_refused_unless_overwrite(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["pretrain", f"data.train={corpus}", f"out_dir={out}", "train.max_steps=2", *TINY]
    assert run_cli(*args) == 0
    assert run_cli(*args) == 2
    assert "already holds files" in capsys.readouterr().err
    assert run_cli(*args, "overwrite=true") == 0
    # overwrite=true never deletes the parent model or the data with the directory it replaces
    cpt = ["pretrain", f"init_from={out}", f"out_dir={out}", "overwrite=true", f"data.train={corpus}",
           "train.max_steps=2", *TINY]
    assert run_cli(*cpt) == 2 and "would delete" in capsys.readouterr().err
    inner = out / "more.txt"
    inner.write_text(corpus.read_text())
    assert run_cli("pretrain", f"data.train={inner}", f"out_dir={out}", "overwrite=true", "train.max_steps=2",
                   *TINY) == 2
    assert "would delete" in capsys.readouterr().err and (out / "model").is_dir()
    # a mistyped input stops the run before the one it would replace is deleted
    assert run_cli("pretrain", f"data.train={tmp_path / 'typo.txt'}", f"out_dir={out}", "overwrite=true",
                   "train.max_steps=2", *TINY) == 2
    assert "typo.txt does not exist" in capsys.readouterr().err and (out / "model").is_dir()
    # nor a directory that no run wrote
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    assert run_cli(*args[:2], f"out_dir={other}", *args[3:], "overwrite=true") == 2
    assert "no pretune run wrote" in capsys.readouterr().err and (other / "mine.txt").is_file()


def _diverge(tmp_path, corpus, at_call: int, overrides: list[str], match: str) -> None:
    """A run whose loss becomes NaN at the objective's `at_call`-th call must raise TrainingDiverged."""
    from pretune.config import Config, load_config
    from pretune.data.corpus import PretrainData, build_tokenizer, load_corpus
    from pretune.model.config import resolve_model_config
    from pretune.model.gpt import GPT
    from pretune.train.dist import setup
    from pretune.train.loop import TrainingDiverged, train
    from pretune.train.objectives import LMObjective

    class PoisonAt(LMObjective):
        calls = 0

        def __call__(self, model, batch):
            PoisonAt.calls += 1
            loss = super().__call__(model, batch)
            return loss * float("nan") if PoisonAt.calls == at_call else loss

    cfg = load_config(Config, None, [f"data.train={corpus}", f"out_dir={tmp_path}", *overrides])
    tok = build_tokenizer(cfg.data)
    model = GPT(resolve_model_config(cfg.model, tok.vocab_size))
    data = PretrainData(load_corpus(cfg.data, tok, 32), 32, 8, None, 0)
    with pytest.raises(TrainingDiverged, match=match):
        train(model, cfg, setup("cpu"), tmp_path, data, PoisonAt(), tokenizer=tok, log=lambda m: None)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus):
    _diverge(tmp_path, corpus, 13, ["train.max_steps=30", *TINY],
             "at step 13; the last good checkpoint is .*step-000010")
    assert [d.name for d in (tmp_path / "checkpoints").iterdir()] == ["step-000010"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
    assert not (tmp_path / "model").exists()


def test_a_nan_gradient_under_a_finite_loss_stops_before_its_weights_are_saved(tmp_path, corpus):
    from pretune.config import Config, load_config
    from pretune.data.corpus import PretrainData, build_tokenizer, load_corpus
    from pretune.model.config import resolve_model_config
    from pretune.model.gpt import GPT
    from pretune.train.dist import setup
    from pretune.train.loop import TrainingDiverged, train
    from pretune.train.objectives import LMObjective

    class NaNGradient(torch.autograd.Function):
        """The identity forward, a NaN gradient backward: the loss looks fine, the update is not."""

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    class PoisonGradAt(LMObjective):
        calls = 0

        def __call__(self, model, batch):
            PoisonGradAt.calls += 1
            loss = super().__call__(model, batch)
            return NaNGradient.apply(loss) if PoisonGradAt.calls == 10 else loss

    cfg = load_config(Config, None, [f"data.train={corpus}", f"out_dir={tmp_path}", "train.max_steps=30", *TINY,
                                     "train.save_every=5"])
    tok = build_tokenizer(cfg.data)
    model = GPT(resolve_model_config(cfg.model, tok.vocab_size))
    data = PretrainData(load_corpus(cfg.data, tok, 32), 32, 8, None, 0)
    with pytest.raises(TrainingDiverged, match="gradient became NaN or infinite at step 10; the last good "
                                               "checkpoint is .*step-000005"):
        train(model, cfg, setup("cpu"), tmp_path, data, PoisonGradAt(), tokenizer=tok, log=lambda m: None)
    assert [d.name for d in (tmp_path / "checkpoints").iterdir()] == ["step-000005"]
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in logged and [json.loads(line) for line in logged.splitlines()]  # strict JSON


def test_evaluate_and_generate_cli(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", "train.max_steps=30", *TINY) == 0
    capsys.readouterr()
    assert run_cli("evaluate", out, f"data.val={corpus}", "max_tokens=3000", f"out={tmp_path / 'e.json'}") == 0
    assert "bits/byte" in capsys.readouterr().out
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["tokens"] > 2000 and 0 < r["bpb"] < 8 and abs(r["ppl"] - torch.tensor(r["loss"]).exp().item()) < 1e-3
    # max_tokens is the budget across all sources; a text shorter than a window is scored whole; too
    # long a window is an error
    assert run_cli("evaluate", out, f"data.val=[{corpus},{corpus}]", "max_tokens=3000", f"out={tmp_path / 'e2.json'}") == 0
    assert json.loads((tmp_path / "e2.json").read_text())["tokens"] == r["tokens"]
    (tmp_path / "short.txt").write_text("the cat\n")
    assert run_cli("evaluate", out, f"data.val={tmp_path / 'short.txt'}", f"out={tmp_path / 'e3.json'}") == 0
    assert json.loads((tmp_path / "e3.json").read_text())["tokens"] == 8  # 8 characters and EOS: 8 targets
    assert run_cli("evaluate", out, f"data.val={corpus}", "seq_len=1000") == 2
    assert "longer than the model's context" in capsys.readouterr().err
    assert run_cli("generate", out, "prompt=the ", "max_new_tokens=20", "seed=3", "device=cpu") == 0
    first = capsys.readouterr().out
    assert run_cli("generate", out, "prompt=the ", "max_new_tokens=20", "seed=3", "device=cpu") == 0
    assert capsys.readouterr().out == first and first.startswith("the ") and len(first) > 10


def test_cli_help_is_fast_and_does_not_import_torch():
    code = "import sys; from pretune.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "pretrain" in r.stdout and time.perf_counter() - t0 < 5  # generous for a loaded CI machine


def test_unknown_verb_and_bad_key_exit_cleanly(capsys):
    assert run_cli("pretrian") == 2
    assert "did you mean pretrain" in capsys.readouterr().err
    assert run_cli("pretrain", "train.max_step=3") == 2
    assert "did you mean train.max_steps" in capsys.readouterr().err


def test_default_warmup_is_a_tenth_of_a_short_run_and_a_long_warmup_is_flagged(tmp_path, corpus, capsys):
    from pretune.config import OptimConfig
    from pretune.train.optim import lr_at

    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.0)
    assert [round(lr_at(s, cfg, 60), 3) for s in range(6)] == [0.167, 0.333, 0.5, 0.667, 0.833, 1.0]
    assert lr_at(59, cfg, 60) < 0.01  # decayed by the end of the run
    assert lr_at(99, cfg, 5000) == 1.0 and lr_at(98, cfg, 5000) < 1.0  # long runs: 100 steps
    assert lr_at(9, OptimConfig(lr=1.0, warmup_steps=10), 60) == 1.0  # an explicit value is kept

    out = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("optim.warmup_steps")]
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", "train.max_steps=6", *args,
                   "optim.warmup_steps=10") == 0
    assert "optim.warmup_steps=10 is not shorter than the run's 6 steps" in capsys.readouterr().out



def test_wsd_decay_starts_after_the_warmup_and_ends_at_the_minimum():
    import itertools

    from pretune.config import OptimConfig
    from pretune.train.optim import lr_at

    def lrs(max_steps, **kw):
        cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, schedule="wsd", **kw)
        return [round(lr_at(s, cfg, max_steps), 4) for s in range(max_steps)]

    # the usual shape: warmup, stable at the peak, then the last fifth decays linearly to the minimum
    assert lrs(10, warmup_steps=2) == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.55, 0.1]
    # a decay that would overlap the warmup starts at its end: the lr reaches its peak first, then falls
    # without a jump (it started at step 0 before, hidden by the warmup: 0.5, 1.0, then 0.73)
    overlap = lrs(10, warmup_steps=2, decay_fraction=1.0)
    assert overlap[:2] == [0.5, 1.0] and overlap[-1] == 0.1
    assert all(b < a for a, b in itertools.pairwise(overlap[1:]))
    assert overlap[2] == round(1.0 - 0.9 / 8, 4)  # the decay's 8 steps are the ones after the warmup
    assert lrs(10, warmup_steps=9, decay_fraction=0.5) == [round((s + 1) / 9, 4) for s in range(9)] + [0.1]


def test_pretrain_refuses_fine_tuning_keys_and_names_them(tmp_path, corpus, capsys):
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={tmp_path / 'run'}", *TINY,
                   "finetune.replay=[general.txt]", "lora.rank=4") == 2
    err = capsys.readouterr().err
    assert "lora.rank, finetune.replay: fine-tuning keys, which pretrain does not read" in err
    assert "data.weights" in err and not (tmp_path / "run").exists()


def test_prefetched_batches_are_the_batches_of_each_step():
    """The loop's background builder gives each step exactly its own batches, in order or after a
    jump; never builds two steps at once; and raises a data error at the step that needs it."""
    import threading

    from pretune.data.sources import DataError
    from pretune.train.prefetch import Prefetcher

    class Steps:
        def __init__(self):
            self.busy, self.overlapped, self.threads = threading.Lock(), False, set()

        def micro_batches(self, step, rank, world):
            if not self.busy.acquire(blocking=False):
                self.overlapped = True
                self.busy.acquire()
            try:
                self.threads.add(threading.current_thread().name)
                time.sleep(0.01)
                if step == 7:
                    raise DataError("bad record at step 7")
                return [{"input_ids": torch.full((2, 3), step * 10 + rank), "world": world}]
            finally:
                self.busy.release()

    data = Steps()
    fetch = Prefetcher(data, rank=1, world=2, background=True)  # as the loop builds on CUDA
    try:
        for step in [0, 1, 2, 5, 6, 3]:  # in order, a jump ahead, and one back
            (mb,) = fetch.get(step)
            assert mb["world"] == 2 and torch.equal(mb["input_ids"], torch.full((2, 3), step * 10 + 1))
        assert fetch.get(6, ahead=True)[0]["input_ids"][0, 0] == 61  # step 7, which fails, builds behind it
        with pytest.raises(DataError, match="step 7"):
            fetch.get(7)
    finally:
        fetch.close()
    assert not data.overlapped
    assert any(name.startswith("pretune-batches") for name in data.threads)  # steps were built ahead
    inline = Prefetcher(data, rank=0, world=1, device=torch.device("cpu"))  # the loop's setting on the CPU
    data.threads.clear()
    assert [inline.get(s)[0]["input_ids"][0, 0].item() for s in (0, 1, 4)] == [0, 10, 40]
    inline.close()
    assert data.threads == {threading.current_thread().name}


# ----------------------------------------------------------------------------- early stopping and run ends

SMALL = [*TINY, "model.n_layer=1", "model.d_model=32", "model.n_head=2"]
EARLY = ["train.max_steps=200", "train.eval_every=2", "optim.lr=0.08", "optim.warmup_steps=0",
         "optim.schedule=constant", "train.early_stop_metric=val_loss", "train.patience=2"]


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory):
    """A pre-training run that patience stops (checkpoints every 2 steps, a loss line only at the end)."""
    from conftest import make_corpus

    root = tmp_path_factory.mktemp("early")
    corpus = make_corpus(root / "corpus.txt", lines=600)
    out = root / "run"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", *SMALL, *EARLY, "train.save_every=2",
                   "train.log_every=1000") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "early_stopped" and summary["steps"] < 200
    return out


def test_a_resume_at_the_early_stop_step_ends_there_as_the_run_did(tmp_path, early_stopped):
    import shutil

    from safetensors.torch import load_file

    run = tmp_path / "run"
    shutil.copytree(early_stopped, run, ignore=shutil.ignore_patterns(".lock"))
    whole = json.loads((run / "summary.json").read_text())
    stop = whole["steps"]
    assert (run / "checkpoints" / f"step-{stop:06d}").is_dir()
    # killed after the checkpoint of the early-stop step, before model/ and summary.json were written
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()
    assert run_cli("pretrain", f"resume={run}") == 0
    again = json.loads((run / "summary.json").read_text())
    assert (again["status"], again["steps"], again["best_step"]) == ("early_stopped", stop, whole["best_step"])
    assert (again["train_loss"], again["val_loss"], again["tokens"]) == (whole["train_loss"], whole["val_loss"],
                                                                          whole["tokens"])
    assert max(r["step"] for r in read_metrics(run)) == stop  # not one step more
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (early_stopped, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_pretrain_summary_reports_the_figures_of_the_best_model_it_saved(early_stopped):
    summary = json.loads((early_stopped / "summary.json").read_text())
    evals = {r["step"]: r for r in read_metrics(early_stopped) if "val_loss" in r}
    best, last = evals[summary["best_step"]], evals[max(evals)]
    assert summary["best_step"] < summary["steps"] and last["val_loss"] != best["val_loss"]
    for k in ("val_loss", "val_ppl", "val_bpb"):  # the best evaluation's figures, not the last one's
        assert summary[k] == pytest.approx(best[k], abs=1e-5)
    assert summary["eval_step"] == summary["best_step"]  # the step the figures come from


def test_an_early_stop_between_log_steps_logs_and_saves_its_last_interval(tmp_path, corpus):
    out = tmp_path / "run"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", *SMALL, *EARLY, "train.log_every=1000",
                   "train.save_every=1000") == 0
    summary = json.loads((out / "summary.json").read_text())
    stop = summary["steps"]
    assert summary["status"] == "early_stopped" and stop < 200
    losses = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in losses] == [stop]  # the early-stop step is logged as a last step is
    assert summary["train_loss"] == pytest.approx(losses[-1]["loss"], abs=1e-6)
    assert [d.name for d in (out / "checkpoints").iterdir()] == [f"step-{stop:06d}"]  # and saved


def test_a_resume_takes_the_best_weights_its_checkpoint_records_not_those_a_killed_session_left(tmp_path, corpus):
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", *SMALL, "train.max_steps=12",
                   "train.eval_every=2", "train.save_every=4", "train.keep_last=10",
                   "train.early_stop_metric=val_loss") == 0
    assert json.loads((out / "summary.json").read_text())["best_step"] > 4
    stale = load_file(str(out / "best" / "model.safetensors"))
    # killed after step 4's checkpoint: best/ holds the weights of a later, better step
    for d in (out / "checkpoints").iterdir():
        if d.name != "step-000004":
            shutil.rmtree(d)
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    # the resumed session does not beat step 4 (a learning rate far too high), so step 4 stays the best
    assert run_cli("pretrain", f"resume={out}", "optim.lr=0.5") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == 4
    final = load_file(str(out / "model" / "model.safetensors"))
    step4 = load_file(str(out / "checkpoints" / "step-000004" / "model.safetensors"))
    assert all(torch.equal(final[k], step4[k]) for k in final)
    assert not all(torch.equal(final[k], stale[k]) for k in final)


def test_a_diverged_run_without_a_checkpoint_names_none_as_null(tmp_path, corpus):
    _diverge(tmp_path, corpus, 3, ["train.max_steps=8", *SMALL], "no checkpoint was written")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["last_checkpoint"] is None


def test_the_divergence_error_offers_to_resume_only_when_there_is_a_checkpoint(tmp_path, corpus):
    from pretune.cli import main

    base = [f"data.train={corpus}", *SMALL, "train.max_steps=8", "optim.lr=1e6", "train.grad_clip=0"]
    for name, save in (("none", "train.save_every=100"), ("some", "train.save_every=1")):
        assert main(["pretrain", *base, save, f"out_dir={tmp_path / name}"]) != 0
    none, some = (json.loads((tmp_path / n / "summary.json").read_text())["error"] for n in ("none", "some"))
    assert "lower optim.lr (overwrite=true)" in none and "resume" not in none.replace("nothing to resume", "")
    assert "the last good checkpoint is" in some and "resume=RUN from that checkpoint" in some


def test_the_ddp_wrap_uses_no_deprecated_argument(tmp_path):
    import warnings
    import torch.distributed as tdist
    from pretune.config import Config, load_config
    from pretune.train.dist import Runtime, wrap_model
    cfg = load_config(Config, None, ["train.compile=false"])
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fwd = wrap_model(torch.nn.Linear(2, 2), cfg, Runtime(0, 2))  # rt.distributed: the DDP wrap
        assert not [w for w in seen if issubclass(w.category, FutureWarning)] and fwd.broadcast_buffers is False
    finally:
        tdist.destroy_process_group()


def test_figures_are_rounded_to_six_places_but_a_tiny_one_keeps_its_digits():
    from pretune.train.loop import _round

    assert _round(0.123456789) == 0.123457 and _round(3.0e-7) == 3.0e-7 and _round(1.23456789e-5) == 1.23457e-5
    assert _round(float("nan")) is None and _round({"a": {"b": 2.0000004}}) == {"a": {"b": 2.0}}

