"""Fixes to `pretune study` and its meters: a changed `shots` is refused like any changed setting,
every run's config is checked before anything runs, a stopped run resumes only with the config the
study asks for, 2-seed intervals keep their 95% level, break-even says why, long bias pairs are not
cut into ties, and CPU energy is charged per run, not per machine."""

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import make_corpus, sentiment
from pretune.errors import ConfigError
from pretune.study.config import load_study


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- a study with a given base


class Reached(Exception):
    """Raised where run_study has checked every run and would start them."""


def _fake_base(root):
    """A base model directory that job_config can read (a prompting arm's context), never loaded."""
    model = root / "base" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"max_seq_len": 64}))
    (model / "model.safetensors").write_bytes(b"")
    return root / "base"


@pytest.fixture
def given_base_study(tmp_path, monkeypatch):
    """A study on a given base whose runs all finished before (as their files say), and run_study
    patched so that it stops (Reached) where it would start the runs: what is refused before that."""
    from pretune.stages import save_run_config
    from pretune.study import runner

    base = _fake_base(tmp_path)
    spec = {"name": "t", "out_dir": str(tmp_path / "study"), "base": {"run": str(base)},
            "tasks": {"sent": {"task": "classification", "train": str(sentiment(tmp_path / "train.jsonl", 40, 0)),
                               "val": str(sentiment(tmp_path / "val.jsonl", 8, 1)),
                               "test": str(sentiment(tmp_path / "test.jsonl", 16, 2))}},
            "arms": ["full", "few-shot", {"name": "three", "init": "base", "method": "none", "shots": 3}],
            "sizes": [8], "seeds": [0, 1], "shots": 2, "device": "cpu", "threads": 1,
            "finetune": {"train": {"batch_size": 8}, "optim": {"lr": 3e-3}}}
    path = _write(tmp_path / "study.yaml", spec)
    study = load_study(str(path))
    runner.prepare_study_dir(study)
    counts = {name: runner.task_records(study, name) for name in study.tasks}
    probe = runner.probe_settings(runner._probe_args(study))
    planned = runner.plan_runs(study, base, None, counts)
    for p in planned:
        p.run_dir.mkdir(parents=True)
        save_run_config(p.config, p.run_dir)
        summary = {"status": "completed", "probe": {"settings": probe}}
        if p.shots is not None:  # what run_prompting writes
            summary.update(shots=p.shots, train_examples=p.size)
        (p.run_dir / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(runner, "stage_probes", lambda study, stages, log: {"base": {}})

    def reached(study, root):
        raise Reached

    monkeypatch.setattr(runner, "write_study_yaml", reached)
    return path, spec, planned


def test_a_changed_number_of_shots_is_refused_not_reused(given_base_study, tmp_path):
    from pretune.study.runner import run_study

    path, spec, planned = given_base_study
    with pytest.raises(Reached):  # the same study: every run is reused
        run_study(load_study(str(path)), log=lambda m: None)
    with pytest.raises(ConfigError, match=r"few-shot/n8/s0 was run with shots=2 but the study now asks for 4"):
        run_study(load_study(str(path), ["shots=4"]), log=lambda m: None)
    # a spelt-out prompting arm the same
    arms = spec["arms"][:2] + [dict(spec["arms"][2], shots=1)]
    with pytest.raises(ConfigError, match=r"three/n8/s0 was run with shots=3 but the study now asks for 1"):
        run_study(load_study(str(_write(tmp_path / "s2.yaml", dict(spec, arms=arms)))), log=lambda m: None)


def test_a_stopped_fine_tuning_run_made_with_other_settings_is_refused_before_anything_runs(given_base_study):
    from pretune.config_io import read_yaml
    from pretune.study.runner import run_study

    path, spec, planned = given_base_study
    killed = next(p for p in planned if p.arm == "full" and p.seed == 1).run_dir
    (killed / "summary.json").unlink()  # killed part-way, with a checkpoint to resume from
    (killed / "checkpoints" / "step-000001").mkdir(parents=True)
    (killed / "checkpoints" / "step-000001" / "state.json").write_text("{}")
    with pytest.raises(Reached):  # the same settings: it will resume
        run_study(load_study(str(path)), log=lambda m: None)
    saved = read_yaml(killed / "config.yaml")
    saved["optim"]["lr"] = 0.01  # it was started with another learning rate
    (killed / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"full/n8/s1 was run with optim.lr=0.01 but the study now asks for 0.003"):
        run_study(load_study(str(path)), log=lambda m: None)


def _stopped_run(run_dir, cfg):
    from pretune.stages import save_run_config

    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run_dir)
    (run_dir / "checkpoints" / "step-000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000010" / "state.json").write_text("{}")


def test_a_stopped_stage_or_run_resumes_only_with_the_config_the_study_asks_for(tmp_path, monkeypatch):
    import pretune.finetune
    import pretune.stages
    from pretune.config import Config, load_config
    from pretune.config_io import to_dict
    from pretune.study.runner import run_job, run_stage

    calls = []
    monkeypatch.setattr(pretune.stages, "run_pretrain", lambda cfg, log: calls.append(cfg) or
                        {"status": "completed", "wall_s": 1.0})
    monkeypatch.setattr(pretune.finetune, "run_finetune", lambda cfg, log: calls.append(cfg) or
                        {"status": "completed", "probe": {"settings": {}}})
    base = tmp_path / "base"
    old = ["train.max_steps=400", "optim.lr=0.003", "data.tokenizer=char", f"out_dir={base}"]
    _stopped_run(base, load_config(Config, None, old))
    new = load_config(Config, None, ["train.max_steps=300", "optim.lr=0.01", "data.tokenizer=char", f"out_dir={base}"])
    with pytest.raises(ConfigError, match="was run with optim.lr=0.003 but the study now asks for 0.01"):
        run_stage(new, lambda m: None)
    assert not calls  # refused before resuming
    assert run_stage(load_config(Config, None, old), lambda m: None) == base  # the same: resumed
    assert len(calls) == 1 and calls[0].resume == str(base)
    # a fine-tuning run that saves checkpoints (finetune.train.save_every) the same
    run = tmp_path / "t/full/n8/s0"
    ft = ["task=classification", f"init_from={base}", f"out_dir={run}", "train.save_every=5"]
    _stopped_run(run, load_config(Config, None, ft + ["optim.lr=0.001"]))
    with pytest.raises(ConfigError, match="was run with optim.lr=0.001"):
        run_job(to_dict(load_config(Config, None, ft + ["optim.lr=0.002"])), None, {}, None)
    assert len(calls) == 1
    assert run_job(to_dict(load_config(Config, None, ft + ["optim.lr=0.001"])), None, {}, None)["status"] == "completed"
    assert len(calls) == 2 and calls[1].resume == str(run)


# ----------------------------------------------------------------------------- keys checked up front


def test_bad_keys_anywhere_in_the_study_are_all_reported_by_load_study(tmp_path):
    """Before anything runs (load_study), not after base pre-training and CPT, and all at once."""
    general = make_corpus(tmp_path / "general.txt", lines=20)
    spec = {"name": "t", "out_dir": str(tmp_path / "study"),
            "base": {"pretrain": {"data": {"train": [str(general)], "tokenizer": "char"},
                                  "train": {"max_stepz": 12}}},
            "cpt": {"data": [str(general)], "steps": 4, "replay_ratio": 0.0, "config": {"optim": {"lrr": 0.1}}},
            "tasks": {"sent": {"task": "classification", "train": str(sentiment(tmp_path / "train.jsonl", 40, 0)),
                               "test": str(sentiment(tmp_path / "test.jsonl", 16, 2)),
                               "config": {"finetune": {"max_lenn": 64}}}},
            "arms": ["scratch", "full", "cpt+lora", "few-shot",
                     {"name": "mine", "init": "base", "method": "lora", "config": {"lora": {"rankk": 4}}}],
            "finetune": {"train": {"batch_sise": 8}}, "arm_config": {"lora": {"optim": {"weight_decayy": 0.1}}}}
    with pytest.raises(ConfigError) as e:
        load_study(str(_write(tmp_path / "s.yaml", spec)))
    text = str(e.value)
    for expected in ("base.pretrain: unknown key train.max_stepz", "cpt: unknown key optim.lrr",
                     "every task and arm: unknown key train.batch_sise",  # once, not once per run
                     "unknown key finetune.max_lenn", "arms cpt+lora, mine: unknown key optim.weight_decayy",
                     "arm mine: unknown key lora.rankk"):
        assert expected in text, (expected, text)
    assert text.count("batch_sise") == 1
    # the same study without the typos loads; placeholders raise nothing for arms that read the base
    spec["base"]["pretrain"]["train"] = {"max_steps": 12}
    spec["cpt"]["config"], spec["tasks"]["sent"]["config"], spec["arm_config"] = {}, {}, {}
    spec["arms"][-1]["config"] = {"lora": {"rank": 4}}
    spec["finetune"] = {"train": {"batch_size": 8}, "model": {"n_layer": 99, "dropout": 0.1}}
    study = load_study(str(_write(tmp_path / "s.yaml", spec)))
    assert len(study.arms) == 5


# ----------------------------------------------------------------------------- statistics


def _two_seed_studies(n_studies: int, n_seeds: int = 2, n_ex: int = 100, seed_sd: float = 0.5,
                      example_sd: float = 0.5, n_boot: int = 200):
    """(share of null paired differences called significant, coverage of the score interval) over
    simulated studies: per-example scores x[s, j] = b_s + a_j + e_sj with a seed effect b, an effect
    a of the test example shared by the seeds, and noise e ~ N(0, 1); the true mean is 0."""
    from pretune.study.stats import _rng, paired_diff, score_ci

    rng = np.random.default_rng(12345)
    false_pos = covered = 0
    for i in range(n_studies):
        x = (rng.normal(0, seed_sd, (n_seeds, 1)) + rng.normal(0, example_sd, (1, n_ex))
             + rng.normal(0, 1, (n_seeds, n_ex)))
        a = [{"seed": s, "score": float(x[s].mean()), "example_scores": x[s].tolist()} for s in range(n_seeds)]
        zero = [{"seed": s, "score": 0.0, "example_scores": [0.0] * n_ex} for s in range(n_seeds)]
        false_pos += paired_diff(a, zero, _rng(0, "pair", i), n_boot)["significant"]
        ci = score_ci(a, _rng(0, "cell", i), n_boot)
        covered += ci["lo"] <= 0.0 <= ci["hi"]
    return false_pos / n_studies, covered / n_studies


def test_two_seed_intervals_keep_their_level():
    """With 2 seeds the plug-in Welch-Satterthwaite df (from a seed variance of 1 degree of freedom)
    called about 10% of null differences real and covered about 0.89; the df taken from the seed
    variance's upper confidence bound keeps them at or below 5% and at or above 95%."""
    false_pos, coverage = _two_seed_studies(500)  # about 2 s
    assert false_pos <= 0.075 and coverage >= 0.925, (false_pos, coverage)


def test_seed_df_stays_at_n_minus_1_when_seeds_dominate_and_one_seed_keeps_the_percentile_interval():
    from pretune.study.stats import chi2_quantile, seed_df, seed_var_inflation

    assert chi2_quantile(0.2, 1) == pytest.approx(0.0641847546673016, rel=1e-9)  # scipy.stats.chi2.ppf
    assert chi2_quantile(0.2, 4) == pytest.approx(1.648776618065969, rel=1e-9)
    assert seed_var_inflation(2) == pytest.approx(15.580, abs=1e-3)
    assert seed_df(np.array([[1.0, 0.0, 1.0, 1.0]])) is None  # one seed: the percentile interval
    assert seed_df(np.array([[1.0, 0.0], [1.0, 0.0]])) is None  # seeds that agree exactly
    x = np.array([[0.0] * 50 + [1.0] * 50, [1.0] * 50 + [0.0] * 50]) + np.array([[0.0], [0.4]])
    assert seed_df(x) == pytest.approx(1.0, abs=0.01)


# ----------------------------------------------------------------------------- break-even


def test_break_even_says_an_arm_not_cheaper_per_task_never_breaks_even_even_with_the_base_cost_unknown():
    from pretune.study.decide import break_even

    assert break_even(None, 2.5e8, 1.6e8) == (None, "not cheaper per task than training from scratch: "
                                                    "never breaks even")
    assert break_even(None, 1.6e8, 1.6e8)[1].startswith("not cheaper")
    assert "unknown" in break_even(None, 1e8, 1.6e8)[1]  # cheaper: the base cost would decide


# ----------------------------------------------------------------------------- bias probe


@pytest.fixture(scope="module")
def small_context_model():
    from pretune.data.tokenizer import train_char
    from pretune.model.config import ModelConfig
    from pretune.model.gpt import GPT

    tok = train_char(["the cat dog fox bird sat on a mat by the river and sang, was lazy."])
    torch.manual_seed(0)
    model = GPT(ModelConfig(preset="tiny", max_seq_len=32, vocab_size=tok.vocab_size)).eval()
    return model, tok


def test_bias_pairs_longer_than_the_context_are_windowed_or_skipped_never_cut_into_ties(small_context_model):
    from pretune.eval.bias import bias_score, sentence_logprobs
    from pretune.train.objectives import sequence_logprobs
    from pretune.data import tasks as T

    model, tok = small_context_model
    pre = "the cat sat on the mat by the river and the dog sang, "  # 54 characters: past the context
    pairs = [{"more": pre + f"the {a} was lazy.", "less": pre + f"the {b} was lazy.", "type": "x"}
             for a, b in (("cat", "dog"), ("dog", "cat"), ("fox", "bird"), ("bird", "fox"))]
    b = bias_score(model, tok, pairs, "cpu")
    # the same pair both ways round: one preference each way, not two ties counted as 'prefers less'
    assert b["prefers_more"][0] + b["prefers_more"][1] == 1 and b["prefers_more"][2] + b["prefers_more"][3] == 1
    assert b["score"] == 0.5 and b["n"] == 4 and b["n_skipped"] == 0
    # the window: the last tokens that fit, the shared beginning as context, compared from the first difference
    more, less = (tok.encode(pairs[0][k]) for k in ("more", "less"))
    shared = next(i for i, (x, y) in enumerate(zip(more, less)) if x != y)
    cut = len(more) + 1 - 33
    rows = [ids[cut - 1:] for ids in (more, less)]
    batch = T.lm_batch(rows, [[0] * (shared - cut + 1) + [1] * (len(r) - shared + cut - 1) for r in rows], tok.pad_id)
    logp = sequence_logprobs(model, batch)
    assert b["prefers_more"][0] == int(logp[0] > logp[1])
    # a pair that differs at its start and does not fit: left out and counted, not scored
    long = [{"more": "cat " + pre + pre, "less": "dog " + pre + pre, "type": "y"}]
    skipped = bias_score(model, tok, long + pairs[:2], "cpu")
    assert skipped["n_skipped"] == 1 and skipped["n"] == 2 and skipped["prefers_more"][0] is None
    assert skipped["by_type"] == {"x": 0.5} and skipped["score"] == 0.5
    with pytest.raises(ValueError, match="more than the model's context"):
        sentence_logprobs(model, tok, [pre + pre], "cpu")
    # an exact tie counts half; pairs that fit are scored whole, as before
    short = [{"more": "the cat sat.", "less": "the cat sat.", "type": "t"},
             {"more": "the cat sat.", "less": "the dog sat.", "type": "t"}]
    s = bias_score(model, tok, short, "cpu")
    whole = sentence_logprobs(model, tok, ["the cat sat.", "the dog sat."], "cpu")
    assert s["prefers_more"] == [0.5, int(whole[0] > whole[1])] and s["n_skipped"] == 0


def test_bias_pair_changes_leave_out_pairs_a_model_skipped():
    from pretune.study.collect import _pair_changes

    assert _pair_changes({"bias_prefers": [1, 0.5, None, 0]}, {"bias_prefers": [0, 0.5, None, 1]}) == [1, 0.0, -1]


# ----------------------------------------------------------------------------- energy


def test_the_cpu_estimate_charges_a_run_its_share_of_the_cores(tmp_path, monkeypatch):
    from pretune.train import meter

    monkeypatch.setattr(meter.os, "cpu_count", lambda: 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        counter = meter.EnergyCounter(torch.device("cpu"), rapl_root=tmp_path / "none")
    finally:
        torch.set_num_threads(threads)
    assert counter.source == "estimate" and counter.label == "estimate (20 W assumed: 2 of 16 cores)"
    assert counter.power_w == pytest.approx(2 * meter.CPU_CORE_W)  # 2 of 16 cores, 10 W each
    given = meter.EnergyCounter(torch.device("cpu"), power_w=100.0, rapl_root=tmp_path / "none")
    assert given.power_w == 100.0 and given.label == "estimate (100 W assumed)"  # a power given is the run's own


def test_rapl_shared_by_parallel_runs_charges_each_its_share_of_the_cpu_time(tmp_path, monkeypatch):
    import os

    from pretune.train import meter

    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("0")
    (zone / "max_energy_range_uj").write_text(str(10**12))
    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"

    def busy(seconds):  # user, nice, system, idle, iowait, irq, softirq, steal
        stat.write_text(f"cpu  {int(seconds * hz)} 0 0 999 0 0 0 0 0 0\ncpu0 1 0 0 0 0 0 0 0 0 0\n")

    own = [10.0]
    monkeypatch.setattr(meter.time, "process_time", lambda: own[0])
    busy(100)
    alone = meter.EnergyCounter(torch.device("cpu"), rapl_root=tmp_path)
    shared = meter.EnergyCounter(torch.device("cpu"), rapl_root=tmp_path, shared=2, proc_stat=stat)
    busy(104)
    own[0] = 11.0  # this process: 1 s of the 4 s the machine was busy
    (zone / "energy_uj").write_text(str(10**6))  # 1 J for the whole package
    assert alone.joules() == pytest.approx(1.0) and alone.label == "rapl"
    assert shared.joules() == pytest.approx(0.25)
    assert shared.label.startswith("rapl, shared: 25% of the package energy") and "2 runs at once" in shared.label
    # a study with parallel > 1 says so to the meter of each run
    meter.shared_by(3)
    try:
        assert meter.EnergyCounter(torch.device("cpu"), rapl_root=tmp_path, proc_stat=stat).shared == 3
    finally:
        meter.shared_by(1)


def test_run_job_tells_the_meter_how_many_runs_share_the_machine(tmp_path, monkeypatch):
    import pretune.finetune
    from pretune.config import Config, load_config
    from pretune.config_io import to_dict
    from pretune.study.runner import run_job
    from pretune.train import meter

    seen = []
    monkeypatch.setattr(pretune.finetune, "run_finetune", lambda cfg, log: seen.append(meter._SHARED_BY) or
                        {"status": "completed", "probe": {"settings": {}}})
    cfg = to_dict(load_config(Config, None, [f"out_dir={tmp_path / 'run'}"]))
    try:
        run_job(cfg, None, {}, None, shared=2)
    finally:
        meter.shared_by(1)
    assert seen == [2]
