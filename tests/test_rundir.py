"""The run directory without training: what overwrite=true may delete, checkpoint order, file modes,
debris a kill leaves, the run's lock, and damaged or mismatched checkpoints as user errors."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from pretune import files
from pretune.model.config import ModelConfig
from pretune.model.gpt import GPT
from pretune.model.io import ModelDirError, find_model_dir, load_model_state
from pretune.train import checkpoint as ck
from pretune.train.checkpoint import RunDirError


def tiny(**kw) -> GPT:
    return GPT(ModelConfig(preset="tiny", vocab_size=40, **kw))


def fake_checkpoint(run, step: int, weights: bool = False):
    d = run / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step}))
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    return d


def a_run(run):
    """The files a finished pretrain run holds (written directly)."""
    for name in ("config.yaml", "lineage.json", "metrics.jsonl", "summary.json", "tokenizer.json",
                 "tokenizer_config.json", "mlflow_run_id", ".lock"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}")
    for d in ("model", "best", "tensorboard", "adapter", "fold-0"):
        (run / d).mkdir()
        (run / d / "x").write_text("x")
    fake_checkpoint(run, 10)
    (run / ".summary.json.tmp-ab12cd34").write_text("")  # a write cut short by a kill
    return run


# ----------------------------------------------------------------------------- 1. overwrite=true


def test_overwrite_never_deletes_a_project_that_has_a_config_yaml(tmp_path):
    project = tmp_path / "myproject"
    (project / "src").mkdir(parents=True)
    (project / "config.yaml").write_text("lr: 1\n")
    (project / "src" / "main.py").write_text("print()\n")
    (project / "thesis.tex").write_text("\\begin{document}\n")
    with pytest.raises(RunDirError, match="no pretune run wrote.*(src|thesis.tex)"):
        ck.prepare_out_dir(project, overwrite=True, resume=False)
    assert (project / "thesis.tex").is_file() and (project / "src" / "main.py").is_file()


def test_overwrite_refuses_a_run_that_holds_other_files_and_replaces_a_clean_one(tmp_path):
    run = a_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    with pytest.raises(RunDirError, match=r"also data, notes.txt.*Remove or move them"):
        ck.prepare_out_dir(run, overwrite=True, resume=False)
    assert (run / "notes.txt").is_file() and (run / "model" / "x").is_file()
    (run / "notes.txt").unlink()
    (run / "data").rmdir()
    assert ck.prepare_out_dir(run, overwrite=True, resume=False) == run
    assert run.is_dir() and not any(run.iterdir())


def test_out_dir_or_resume_that_is_a_file_is_a_run_dir_error(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("x")
    for resume in (False, True):
        with pytest.raises(RunDirError, match="is a file, not a directory"):
            ck.prepare_out_dir(f, overwrite=True, resume=resume)
    with pytest.raises(RunDirError, match="cannot be created"):
        ck.prepare_out_dir(f / "run", overwrite=False, resume=False)
    assert f.read_text() == "x"


# ----------------------------------------------------------------------------- 2. checkpoint order


def test_checkpoints_are_ordered_by_step_past_a_million(tmp_path):
    run = tmp_path / "run"
    for step in (999_998, 999_999, 1_000_000):
        fake_checkpoint(run, step, weights=True)
    assert [d.name for d in ck.checkpoint_dirs(run)] == ["step-999998", "step-999999", "step-1000000"]
    assert ck.latest_checkpoint(run).name == "step-1000000"
    assert find_model_dir(run).name == "step-1000000"
    # rotation keeps the newest two: the checkpoint just written is not the one deleted
    model = tiny()
    opt = torch.optim.AdamW(model.parameters())
    ck.save_checkpoint(run, 1_000_001, model, opt, {}, keep_last=2)
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == ["step-1000000", "step-1000001"]


# ----------------------------------------------------------------------------- 3. file modes


def test_run_files_and_directories_follow_the_umask(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_UMASK", None, raising=False)  # read it again
    old = os.umask(0o022)
    try:
        files.atomic_write_bytes(tmp_path / "summary.json", b"{}")
        with files.atomic_dir(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- 4. debris


def test_resume_sweeps_what_a_kill_left_and_rotation_never_leaves_half_a_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    model = tiny()
    opt = torch.optim.AdamW(model.parameters())
    ck.save_checkpoint(run, 10, model, opt, {}, keep_last=2)
    ck.save_checkpoint(run, 20, model, opt, {}, keep_last=2)

    def killed_midway(path, ignore_errors=False):  # rmtree that dies after deleting the weights
        (path / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(run, 30, model, opt, {}, keep_last=2)
    monkeypatch.undo()
    # the checkpoint being deleted is out of sight: resume never picks one without its weights
    assert [d.name for d in ck.checkpoint_dirs(run)] == ["step-000020", "step-000030"]
    (run / "config.yaml").write_text("{}")
    tmp_ckpt = run / "checkpoints" / ".step-000058.tmp-k2j3h4g5"
    tmp_ckpt.mkdir()
    (tmp_ckpt / "model.safetensors").write_bytes(b"0" * 1000)
    torn = run / "checkpoints" / "step-000005"  # rotation by an older pretune, killed in place
    torn.mkdir()
    (torn / "optimizer.pt").write_bytes(b"0")
    (run / ".model.tmp-abcdefgh").mkdir()
    (run / ".summary.json.tmp-ab12cd34").write_text("")
    ck.prepare_out_dir(run, overwrite=False, resume=True)
    ck.unlock_run_dir(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "config.yaml"]



def test_a_replaced_directory_survives_a_failed_rename_and_a_kill_between_the_renames(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_text("OLD")
    real = type(run).rename

    def no_space(self, target):  # the new copy cannot take the name
        if ".tmp-" in self.name:
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(type(run), "rename", no_space)
    with pytest.raises(OSError, match="No space"), files.atomic_dir(run / "model") as tmp:
        (tmp / "model.safetensors").write_text("NEW")
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == ["model"]  # the old copy has its name back
    assert (run / "model" / "model.safetensors").read_text() == "OLD"
    # a kill between the two renames: only .model.old-PID is left, and resume renames it back
    (run / "config.yaml").write_text("{}")
    (run / "model").rename(run / ".model.old-4242")
    (run / "best").mkdir()
    (run / ".best.old-4243").mkdir()  # replaced, and its new copy in place: debris
    ckpts = run / "checkpoints"
    ckpts.mkdir()
    (ckpts / ".step-000010.old-4244").mkdir()
    (ckpts / ".step-000010.old-4244" / "state.json").write_text("{}")
    ck.prepare_out_dir(run, overwrite=False, resume=True)
    ck.unlock_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best", "checkpoints", "config.yaml", "model"]
    assert (run / "model" / "model.safetensors").read_text() == "OLD"
    assert [d.name for d in ck.checkpoint_dirs(run)] == ["step-000010"]


def test_hidden_user_files_are_not_taken_for_pretune_temporary_files(tmp_path, monkeypatch):
    run = a_run(tmp_path / "run")
    mine = [".config.yaml.original", ".summary.json.previous", ".summary.json.backup_1", ".model.abcdefgh"]
    for name in mine:
        (run / name).write_text("mine")
    assert ck.foreign_entries(run) == sorted(mine)
    with pytest.raises(RunDirError, match="also .*config.yaml.original.*Remove or move them"):
        ck.prepare_out_dir(run, overwrite=True, resume=False)
    # the names pretune's own writes use are still swept on resume; the user's files stay
    left = []

    def killed(src, dst):  # a kill before the rename: the temporary file stays
        left.append(src)
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", killed)
    monkeypatch.setattr(files.Path, "unlink", lambda self, missing_ok=False: None)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(run / "summary.json", b"{}")
    monkeypatch.undo()
    assert os.path.isfile(left[0]) and ck.foreign_entries(run) == sorted(mine)
    ck.prepare_out_dir(run, overwrite=False, resume=True)
    ck.unlock_run_dir(run)
    assert not os.path.exists(left[0]) and not (run / ".summary.json.tmp-ab12cd34").exists()
    assert all((run / name).read_text() == "mine" for name in mine)


# ----------------------------------------------------------------------------- 5. the lock


HOLD = """
import sys, time
from pretune.train.checkpoint import lock_run_dir
lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="runs are not locked without fcntl")
def test_a_second_process_is_refused_a_live_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    (run / "lineage.json").write_text("{}")
    live = run / "checkpoints" / ".step-000058.tmp-k2j3h4g5"  # the live run is writing it
    live.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = rf"another pretune process is using {run} \(pid {holder.pid}\); wait for it or choose another"
        with pytest.raises(RunDirError, match=busy):
            ck.lock_run_dir(run)
        with pytest.raises(RunDirError, match=busy):
            ck.prepare_out_dir(run, overwrite=False, resume=True)
        with pytest.raises(RunDirError, match=busy):
            ck.prepare_out_dir(run, overwrite=True, resume=False)
        assert live.is_dir() and (run / "lineage.json").is_file()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel lets go of a killed process's lock
        try:
            ck.lock_run_dir(run)
            break
        except RunDirError:
            assert time.time() < deadline
            time.sleep(0.05)
    assert ck.lock_run_dir(run) == run / ".lock"  # again in the same process: nothing to do
    assert (run / ".lock").read_text().strip() == str(os.getpid())
    ck.unlock_run_dir(run)


# ----------------------------------------------------------------------------- 6, 7. loading


def test_weights_of_another_width_name_the_tensor_and_both_shapes():
    small, wide = tiny(d_model=64), tiny(d_model=96, d_ff=256)
    with pytest.raises(ModelDirError, match=r"tok_emb.weight has shape \(40, 64\) in the saved weights but "
                                            r"\(40, 96\) in the model; a run's architecture cannot change"):
        load_model_state(wide, small.state_dict())


def test_a_damaged_checkpoint_is_named_with_the_one_to_go_back_to(tmp_path):
    run = tmp_path / "run"
    model = tiny()
    opt = torch.optim.AdamW(model.parameters())
    for step in (10, 20):
        ck.save_checkpoint(run, step, model, opt, {"tokens": step}, keep_last=2)
    last = ck.latest_checkpoint(run)
    data = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(data[:100])  # a copy cut short
    with pytest.raises(RunDirError, match=r"checkpoint .*step-000020 cannot be read .*remove it .*step-000010"):
        ck.load_checkpoint(last, tiny(), opt, "cpu")
    (last / "model.safetensors").write_bytes(data)
    (last / "optimizer.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(RunDirError, match="step-000020 cannot be read"):
        ck.load_checkpoint(last, tiny(), opt, "cpu")
    only = tmp_path / "only"
    ck.save_checkpoint(only, 5, model, opt, {}, keep_last=2)
    (only / "checkpoints" / "step-000005" / "model.safetensors").write_bytes(b"")
    with pytest.raises(RunDirError, match="only checkpoint: start the run again with overwrite=true"):
        ck.load_checkpoint(ck.latest_checkpoint(only), tiny(), opt, "cpu")
    assert ck.load_checkpoint(ck.latest_checkpoint(run).with_name("step-000010"), tiny(), opt, "cpu")["tokens"] == 10


def test_a_run_that_failed_before_writing_anything_can_be_started_again(tmp_path, capsys):
    from conftest import TINY, make_corpus, run_cli

    out = tmp_path / "run"
    assert run_cli("pretrain", f"out_dir={out}", *TINY) == 2  # no data.train: refused after the lock was taken
    assert "data.train is empty" in capsys.readouterr().err
    assert not out.exists()  # it wrote nothing but its lock: the lock and the directory it made are gone
    corpus = make_corpus(tmp_path / "corpus.txt", lines=200)
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", "train.max_steps=2", *TINY) == 0


def test_overwrite_keeps_the_old_run_until_the_new_one_has_started_training(tmp_path, capsys):
    from conftest import TINY, make_corpus, run_cli

    corpus = make_corpus(tmp_path / "c.txt", lines=300)
    out = tmp_path / "run"
    base = ["pretrain", f"data.train={corpus}", f"out_dir={out}", "train.max_steps=2", *TINY]
    assert run_cli(*base) == 0
    before = (out / "summary.json").read_bytes()
    # a check that only fails once the tokenizer is built, after the old run was set aside
    assert run_cli(*base, "overwrite=true", "model.vocab_size=3") == 2
    assert "is back in" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before and (out / "model").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert run_cli(*base, "overwrite=true", "train.max_steps=3") == 0  # a good replacement replaces it
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_saved_config_reads_the_same_data_from_any_directory(tmp_path, monkeypatch):
    from conftest import TINY, make_corpus, run_cli

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_corpus(tmp_path / "a" / "c.txt", lines=300)
    make_corpus(tmp_path / "b" / "c.txt", lines=100, seed=5)  # same name, other text, elsewhere
    monkeypatch.chdir(tmp_path / "a")
    assert run_cli("pretrain", "data.train=c.txt", "out_dir=run", "train.max_steps=2", *TINY) == 0
    saved = (tmp_path / "a" / "run" / "config.yaml").read_text()
    assert str(tmp_path / "a" / "c.txt") in saved
    monkeypatch.chdir(tmp_path / "b")
    assert run_cli("pretrain", str(tmp_path / "a" / "run" / "config.yaml"), "out_dir=again") == 0
    first, again = (json.loads((tmp_path / d / "lineage.json").read_text()) for d in ("a/run", "b/again"))
    # the same text: b/c.txt, a third as long, would give other counts
    assert list(first["data"]["train"].values()) == list(again["data"]["train"].values())


def test_resuming_a_finished_run_touches_nothing(tmp_path, capsys):
    from conftest import TINY, make_corpus, run_cli

    corpus = make_corpus(tmp_path / "c.txt", lines=300)
    out = tmp_path / "run"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", "train.max_steps=2", *TINY) == 0
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_cli("pretrain", f"resume={out}") == 0
    assert "already finished (completed at step 2): nothing to resume" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


def test_a_new_run_that_fails_before_writing_leaves_no_lock_and_no_directory_it_made(tmp_path, capsys):
    from conftest import TINY, run_cli

    missing = f"data.train={tmp_path / 'nope.txt'}"
    made = tmp_path / "runs" / "x5"
    assert run_cli("pretrain", missing, f"out_dir={made}", *TINY) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err
    assert not made.exists()
    stale = tmp_path / "stale"  # what an older failed run left: a lone lock
    stale.mkdir()
    (stale / ck.LOCK_FILE).write_text("12345\n")
    assert run_cli("pretrain", missing, f"out_dir={stale}", *TINY) == 2
    assert not stale.exists()
    empty = tmp_path / "empty"  # made by the user: kept, without a lock
    empty.mkdir()
    assert run_cli("pretrain", missing, f"out_dir={empty}", *TINY) == 2
    assert empty.is_dir() and list(empty.iterdir()) == []
    resumed = tmp_path / "resumed"  # a resumed run's directory is never taken away
    resumed.mkdir()
    (resumed / "config.yaml").write_text(f"data:\n  train: [{tmp_path / 'nope.txt'}]\n")
    assert run_cli("pretrain", f"resume={resumed}") == 2
    assert (resumed / "config.yaml").is_file()



def test_prompting_with_overwrite_replaces_the_run_and_leaves_no_copy_aside(tmp_path):
    from conftest import TINY, make_corpus, run_cli, sentiment

    from pretune.config import Config, load_config
    from pretune.prompting import run_prompting

    corpus = make_corpus(tmp_path / "c.txt", lines=300)
    base = tmp_path / "base"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={base}", "train.max_steps=2", *TINY) == 0
    train, test = sentiment(tmp_path / "train.jsonl", 8), sentiment(tmp_path / "test.jsonl", 8, seed=1)
    out = tmp_path / "runs" / "zero"
    args = [f"init_from={base}", "task=classification", f"data.train={train}", f"data.test={test}",
            f"out_dir={out}", "train.device=cpu"]
    run_prompting(load_config(Config, None, args), shots=0, log=lambda m: None)
    run_prompting(load_config(Config, None, [*args, "overwrite=true"]), shots=2, log=lambda m: None)
    assert json.loads((out / "summary.json").read_text())["shots"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["zero"]  # no .zero.replaced-PID left


def test_a_kill_after_an_old_run_was_set_aside_gives_it_back_to_the_next_run(tmp_path, capsys):
    """overwrite=true sets the old run aside until the new one trains; a process killed in between
    (here at the moment it would have settled it) leaves .run.replaced-PID, and the next run there
    puts it back, whether it resumes or starts anew. A copy killed while it was being deleted
    (.run.discarded-PID) is removed, and a live process's copy is left alone."""
    from conftest import TINY, make_corpus, run_cli

    corpus = make_corpus(tmp_path / "c.txt", lines=300)
    out = tmp_path / "run"
    base = ["pretrain", f"data.train={corpus}", f"out_dir={out}", "train.max_steps=2", *TINY]
    assert run_cli(*base) == 0
    before = (out / "summary.json").read_bytes()
    killed = ("import os, signal, sys\nfrom pretune.train import loop\n"
              "loop.settle_aside = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              "from pretune.cli import main\nsys.exit(main(sys.argv[1:]))")

    def kill_in_set_up():
        r = subprocess.run([sys.executable, "-c", killed, *base, "overwrite=true", "train.max_steps=3"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == -9, r.stderr[-2000:]
        aside = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert len(aside) == 1 and aside[0].startswith(".run.replaced-") and not (out / "summary.json").exists()

    for again in ([*base, "overwrite=true", "model.vocab_size=3"], ["pretrain", f"resume={out}"]):
        kill_in_set_up()
        capsys.readouterr()
        # a new run that fails its set-up, or a resume (of the old run: the killed one never trained)
        assert run_cli(*again) == (2 if "overwrite=true" in again else 0)
        assert "is back in" in capsys.readouterr().err
        assert (out / "summary.json").read_bytes() == before
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".run.discarded-{dead}").mkdir()
    (tmp_path / f".run.replaced-{os.getppid()}").mkdir()  # a live process's
    assert run_cli(*base, "overwrite=true", "train.max_steps=3") == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [f".run.replaced-{os.getppid()}"]
    (tmp_path / f".run.replaced-{dead}").mkdir()  # beside a run that has trained since: left to the user
    capsys.readouterr()
    assert run_cli("pretrain", f"resume={out}") == 0
    assert "has since trained, so it stays there" in capsys.readouterr().err
    assert (tmp_path / f".run.replaced-{dead}").is_dir()


def test_a_run_setting_up_under_its_lock_keeps_its_set_aside_copy(tmp_path):
    """A .run.replaced-PID whose pid looks dead here (another host sharing the file system) is left
    alone while a live process holds the run's lock: that process is still setting up."""
    from pretune.stages import recover_interrupted

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    aside = tmp_path / f".run.replaced-{dead}"
    aside.mkdir()
    (aside / "summary.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        recover_interrupted(run)
        assert aside.is_dir() and not (run / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while aside.exists() and time.time() < deadline:  # once the lock is let go, the copy comes back
        recover_interrupted(run)
        time.sleep(0.1)
    assert not aside.exists() and (run / "summary.json").is_file()
