"""`pretune study`: the arm grammar, strict config errors, and a whole small study end to end
(shared stages run once, every run traced to its directory, a stopped study continued, a changed
config refused)."""

import json
import shutil

import pytest
import yaml

from conftest import TINY, make_corpus, run_cli, sentiment
from pretune.errors import ConfigError
from pretune.study.config import load_study, parse_arm_name


def test_arm_grammar():
    a = parse_arm_name("cpt+lora+replay")
    assert (a.init, a.method, a.replay, a.l2sp, a.shots) == ("cpt", "lora", True, False, None)
    assert parse_arm_name("scratch").init == "scratch"
    assert parse_arm_name("zero-shot").shots == 0 and not parse_arm_name("zero-shot").trains
    assert parse_arm_name("full+l2sp").l2sp
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        parse_arm_name("lorra")
    with pytest.raises(ConfigError, match="did you mean 'replay'"):
        parse_arm_name("full+replya")
    with pytest.raises(ConfigError, match="trains nothing"):
        parse_arm_name("zero-shot+replay")


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_study_errors_name_every_bad_key(tmp_path):
    spec = {"base": {"run": "x"}, "seed": [1], "arms": ["full", "cpt+lora", "fulll"],
            "tasks": {"t": {"task": "classification", "train": "a.jsonl", "tset": "b.jsonl"}}}
    with pytest.raises(ConfigError) as e:
        load_study(str(_write(tmp_path / "s.yaml", spec)))
    text = str(e.value)
    assert "unknown key seed; did you mean seeds?" in text
    spec.pop("seed")
    with pytest.raises(ConfigError) as e:
        load_study(str(_write(tmp_path / "s.yaml", spec)))
    text = str(e.value)
    assert "tasks.t.tset" in text and "did you mean tasks.t.test" in text
    assert "'fulll'" in text and "did you mean 'full'" in text
    assert "cpt.data" in text  # a cpt+ arm without domain text
    # values and files are checked before anything runs, each named with its key
    (tmp_path / "a.jsonl").write_text("")
    spec = {"base": {"run": "x"}, "arms": ["full", {"name": "p", "init": "scratch", "method": "none"}],
            "seeds": [0, 0], "shots": -3, "general_eval": ["nope.txt"], "budget": {"patience": 0},
            "tasks": {"t": {"task": "classification", "train": str(tmp_path / "a.jsonl"), "test": "b.jsonl",
                            "sizes": ["foo", 8]}}}
    with pytest.raises(ConfigError) as e:
        load_study(str(_write(tmp_path / "s.yaml", spec)))
    assert "seeds=[0, 0]" in str(e.value) and "shots=-3" in str(e.value) and "patience=0" in str(e.value)
    spec.pop("budget")
    spec.update(seeds=[0, 1], shots=2)
    with pytest.raises(ConfigError) as e:
        load_study(str(_write(tmp_path / "s.yaml", spec)))
    text = str(e.value)
    for expected in ("tasks.t.test[0]: b.jsonl does not exist", "general_eval[0]: nope.txt does not exist",
                     "tasks.t.sizes[0]='foo'", "arm p: prompting"):
        assert expected in text, expected
    assert "tasks.t.train" not in text


@pytest.fixture(scope="module")
def study_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    general = make_corpus(root / "general.txt", lines=600, seed=0)
    domain = make_corpus(root / "domain.txt", lines=300, seed=1)
    with open(root / "pairs.csv", "w") as fh:
        fh.write("sent_more,sent_less,stereo_antistereo,bias_type\n")
        fh.write("the cat sat on the mat,the dog sat on the mat,stereo,animal\n")
        fh.write("a bird sings,a fox sings,stereo,animal\n")
    tiny = dict(a.split("=", 1) for a in TINY if not a.startswith(("data.tokenizer", "train.seq_len")))
    pretrain = {"data": {"train": [str(general)], "tokenizer": "char"}, "train": {"max_steps": 12, "seq_len": 32},
                "model": {"preset": "tiny"}}
    spec = {
        "name": "tiny", "out_dir": str(root / "study"), "base": {"pretrain": pretrain},
        "cpt": {"data": [str(domain)], "steps": 4, "replay_ratio": 0.25},
        "replay": [str(general)], "general_eval": [str(general)], "eval_tokens": 500,
        "bias_pairs": str(root / "pairs.csv"),
        "tasks": {"sent": {"task": "classification", "train": str(sentiment(root / "train.jsonl", 40, 0)),
                           "val": str(sentiment(root / "val.jsonl", 8, 1)),
                           "test": str(sentiment(root / "test.jsonl", 16, 2)), "target": 0.6}},
        "arms": ["scratch", "full", "lora", "cpt+full+replay", "zero-shot", "few-shot"],
        "sizes": [8, "all"], "seeds": [0, 1], "shots": 2,
        "budget": {"epochs": 1, "min_steps": 2, "max_steps": 3},
        "finetune": {"train": {"batch_size": 8, "threads": 1, "eval_tokens": 500}, "finetune": {"max_len": 64},
                     "optim": {"lr": float(tiny["optim.lr"])}},
        "device": "cpu", "threads": 1,
    }
    return root, spec


def test_study_end_to_end_resume_and_refusal(study_files, capsys):
    root, spec = study_files
    path = _write(root / "study.yaml", spec)
    assert run_cli("study", path) == 0
    out = root / "study"
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    runs = results["runs"]
    # 4 trained arms + few-shot, 2 sizes, 2 seeds; zero-shot once
    assert len(runs) == 5 * 2 * 2 + 1
    assert all(r["status"] == "completed" for r in runs), [r for r in runs if r["status"] != "completed"]
    assert {r["size"] for r in runs} == {0, 8, 40}
    for r in runs:  # every number traces back to its run directory
        summary = json.loads((out / r["run_dir"] / "summary.json").read_text())
        assert r["score"] == summary["accuracy"]
        assert len(r["example_scores"]) == 16 and sum(r["example_scores"]) / 16 == pytest.approx(r["score"])
        assert r["cost"]["flops"] == summary["flops"]
    by = {(r["arm"], r["size"], r["seed"]): r for r in runs}
    assert by[("scratch", 8, 0)]["forgetting"] is None
    assert by[("full", 8, 0)]["forgetting"] is not None and by[("zero-shot", 0, 0)]["forgetting"] == 0
    assert by[("lora", 8, 0)]["trainable_params"] < by[("full", 8, 0)]["trainable_params"]
    assert by[("full", 40, 1)]["steps"] == 3 and by[("full", 8, 1)]["steps"] == 2  # the budget rule
    assert results["stages"]["base"]["cost"]["flops"] > 0 and results["stages"]["cpt"]["cost"]["flops"] > 0
    assert len(by[("full", 8, 0)]["bias_pair_changes"]) == 2  # per pair: intervals resample pairs too
    assert results["summary"]["sent"]["full"]["8"]["bias_change"]["method"] == "seeds+examples"
    assert results["tasks"]["sent"]["chance"] == 0.5  # the majority class of the balanced test set
    lineage = json.loads((out / "sent/cpt+full+replay/n8/s0/lineage.json").read_text())
    assert lineage["parent"].endswith("cpt")

    # a study stopped part-way: one run lost its summary, another never started
    shutil.rmtree(out / "sent/full/n8/s1")
    (out / "sent/lora/n40/s0/summary.json").unlink()
    capsys.readouterr()
    assert run_cli("study", path) == 0
    log = capsys.readouterr().out
    assert "2 to run" in log and "finished before, reused" in log
    assert len(json.loads((out / "results.json").read_text())["runs"]) == len(runs)

    # a changed config is refused rather than silently mixed with the old runs
    spec2 = dict(spec, finetune=dict(spec["finetune"], optim={"lr": 0.01}))
    ran = (out / "study.yaml").read_text()
    assert run_cli("study", _write(root / "study2.yaml", spec2)) != 0
    assert "was run with optim.lr" in capsys.readouterr().err
    assert (out / "study.yaml").read_text() == ran  # study.yaml still holds the study that ran

    # other probe settings: no run trains again, but every model is probed again under them
    spec3 = dict(spec, eval_tokens=300)
    assert run_cli("study", _write(root / "study3.yaml", spec3)) == 0
    log = capsys.readouterr().out
    assert "probing base" in log and f"{len(runs)} to run" in log
    stages = json.loads((out / "stages.json").read_text())
    assert stages["base"]["settings"]["eval_tokens"] == 300
    summary = json.loads((out / "sent/full/n8/s0/summary.json").read_text())
    assert summary["probe"]["settings"]["eval_tokens"] == 300


def test_test_fraction_holds_out_the_same_records_whatever_the_seed(tmp_path):
    from pretune.config import Config, load_config
    from pretune.finetune import _records

    path = sentiment(tmp_path / "all.jsonl", 40, 0)
    splits = []
    for seed in (1, 2):
        cfg = load_config(Config, None, ["task=classification", f"data.train={path}", "data.test_fraction=0.25",
                                         "data.val_fraction=0", f"seed={seed}", "data.max_examples=12"])
        train, _, test, labels, _ = _records(cfg)
        assert len(test) == 10 and len(train) == 12 and labels == ["negative", "positive"]
        splits.append(test)
    assert splits[0] == splits[1]


def test_a_finished_stage_started_from_a_parent_is_reused_whatever_its_resolved_model(tmp_path):
    from pretune.config import Config, load_config
    from pretune.config_io import save_config
    from pretune.study.runner import _check_same

    run = tmp_path / "cpt"
    run.mkdir()
    want = load_config(Config, None, [f"init_from={tmp_path / 'base'}", "train.max_steps=5"])
    saved = load_config(Config, None, [f"init_from={tmp_path / 'base'}", "train.max_steps=5", "model.preset=mini",
                                       "model.n_layer=4"])  # what run_pretrain writes: the parent's architecture
    save_config(saved, run / "config.yaml")
    _check_same(want, run)  # no error
    save_config(load_config(Config, None, [f"init_from={tmp_path / 'base'}", "train.max_steps=9"]), run / "config.yaml")
    with pytest.raises(ConfigError, match="train.max_steps"):
        _check_same(want, run)


def _finished_run(run_dir, parent, created):
    """A finished run directory whose lineage records a parent made at `created`."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "probe": {"settings": {}}}))
    (run_dir / "lineage.json").write_text(json.dumps(
        {"stage": "finetune", "parent": str(parent), "parent_lineage": {"stage": "pretrain", "created": created}}))


def test_a_run_whose_parent_was_made_again_is_run_again(tmp_path, monkeypatch):
    import pretune.finetune
    import pretune.stages
    from pretune.config import Config, load_config
    from pretune.config_io import save_config, to_dict
    from pretune.study.runner import parent_changed, run_job, run_stage

    base = tmp_path / "base"
    base.mkdir()
    (base / "lineage.json").write_text(json.dumps({"stage": "pretrain", "created": "2026-01-01T10:00:00"}))
    run = tmp_path / "sent/full/n8/s0"
    _finished_run(run, base, "2026-01-01T10:00:00")
    assert parent_changed(run) is None
    calls = []
    monkeypatch.setattr(pretune.finetune, "run_finetune", lambda cfg, log: calls.append(cfg) or
                        {"status": "completed", "probe": {"settings": {}}})
    cfg = load_config(Config, None, [f"out_dir={run}", f"init_from={base}"])
    assert run_job(to_dict(cfg), None, {}, None) == {"status": "completed"} and not calls  # reused
    # base/ deleted and made again: the run started from the old one is not reused
    (base / "lineage.json").write_text(json.dumps({"stage": "pretrain", "created": "2026-01-02T09:00:00"}))
    assert "made again" in parent_changed(run)
    assert run_job(to_dict(cfg), None, {}, None) == {"status": "completed"}
    assert len(calls) == 1 and calls[0].overwrite and not calls[0].resume  # from the start, not resumed
    # the same for a shared stage (cpt/ made from base/)
    cpt = tmp_path / "cpt"
    _finished_run(cpt, base, "2026-01-01T10:00:00")
    stage_cfg = load_config(Config, None, [f"out_dir={cpt}", f"init_from={base}"])
    save_config(stage_cfg, cpt / "config.yaml")
    monkeypatch.setattr(pretune.stages, "run_pretrain", lambda cfg, log: calls.append(cfg) or
                        {"status": "completed", "wall_s": 1.0})
    logged = []
    assert run_stage(stage_cfg, logged.append) == cpt
    assert len(calls) == 2 and calls[1].overwrite and any("made again" in m for m in logged), logged


def test_a_run_that_ends_stopped_is_a_failure(tmp_path, monkeypatch):
    import pretune.finetune
    from pretune.config import Config
    from pretune.config_io import to_dict
    from pretune.study.engines import Job, run_jobs

    monkeypatch.setattr(pretune.finetune, "run_finetune", lambda cfg, log: {"status": "stopped", "steps": 3})
    cfg = to_dict(Config(out_dir=str(tmp_path / "run")))
    out = run_jobs([Job("t/full/n16/s0", "pretune.study.runner:run_job",
                        {"config": cfg, "shots": None, "probe": {}, "start_probe": None})], log=lambda m: None)
    assert not out["t/full/n16/s0"]["ok"] and "stopped" in out["t/full/n16/s0"]["error"]


def test_a_crashed_worker_fails_its_own_job_only(capsys):
    from pretune.study.engines import Job, run_jobs

    sleep = {"args": ["sleep", "1"]}
    jobs = [Job("crash", "os:_exit", {"status": 137})] + [Job(f"j{i}", "subprocess:run", sleep) for i in range(4)]
    logged = []
    out = run_jobs(jobs, parallel=2, log=logged.append)
    assert not out["crash"]["ok"] and "crash" in out["crash"]["error"] and "137" in out["crash"]["error"]
    assert all(out[f"j{i}"]["ok"] for i in range(4)), out
    assert any("restart" in m for m in logged), logged


def test_a_parent_made_again_within_the_same_second_is_told_apart(tmp_path):
    from pretune.study.runner import parent_changed
    from pretune.train.checkpoint import write_lineage

    base, run = tmp_path / "base", tmp_path / "run"
    base.mkdir()
    run.mkdir()
    write_lineage(base, "pretrain", None)
    write_lineage(run, "finetune", str(base))
    assert parent_changed(run) is None
    write_lineage(base, "pretrain", None)  # made again at once: the same `created`, another id
    assert "made again" in parent_changed(run)


def test_study_overrides_are_read_by_each_keys_type(tmp_path):
    from pretune.config_io import parse_overrides
    from pretune.study.config import StudyConfig

    from pretune.config_io import from_dict

    raw = parse_overrides(["name=no", "parallel=2", "seeds=[1,2]"], StudyConfig)
    cfg = from_dict(StudyConfig, raw)
    assert (cfg.name, cfg.parallel, cfg.seeds) == ("no", 2, [1, 2])  # the text 'no' is not false
