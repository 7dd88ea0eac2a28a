"""Experiment trackers: a real tiny run mirrored to TensorBoard and MLflow, resumed into the same
MLflow run; a tracker whose package is missing is a ConfigError that says the fix."""

import json
import sys

import pytest

from conftest import TINY, read_metrics, run_cli


def _tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_and_mlflow_mirror_metrics_and_summary_across_a_resume(tmp_path, corpus):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "run", f"file://{tmp_path}/mlruns"
    track = ["track.tensorboard=true", "track.mlflow=true", f"track.mlflow_uri={uri}",
             "track.experiment=pretune-test"]
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", "train.max_steps=20",
                   "train.stop_after=10", *TINY, *track) == 0
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert run_cli("pretrain", f"resume={out}", "train.stop_after=null") == 0
    assert (out / "mlflow_run_id").read_text().strip() == run_id  # the resumed run continued it

    metrics = read_metrics(out)
    summary = json.loads((out / "summary.json").read_text())
    losses = {r["step"]: r["loss"] for r in metrics}
    assert sorted(losses) == list(range(1, 21))

    scalars = _tensorboard_scalars(out / "tensorboard")
    assert sorted(scalars["loss"]) == list(range(1, 21))
    for step, loss in losses.items():
        assert scalars["loss"][step] == pytest.approx(loss, rel=1e-6)
    assert scalars["val_loss"][20] == pytest.approx(metrics[-1]["val_loss"], rel=1e-6)
    assert scalars["summary/train_loss"][20] == pytest.approx(summary["train_loss"], rel=1e-6)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("pretune-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == str(out)
    params = run.data.params
    assert params["train.max_steps"] == "20" and params["model.preset"] == "tiny"
    assert params["train.stop_after"] == "10"  # params are immutable: the first value stays
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx(losses)
    assert run.data.metrics["summary/val_loss"] == pytest.approx(summary["val_loss"])
    assert run.data.metrics["summary/steps"] == 20
    assert "summary/flops_per_token.total" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run_id)] == ["summary.json"]
    (tmp_path / "artifacts").mkdir()
    logged = client.download_artifacts(run_id, "summary.json", str(tmp_path / "artifacts"))
    assert json.loads(open(logged).read()) == summary



def test_a_resume_after_a_kill_logs_each_step_once_to_mlflow(tmp_path, corpus):
    pytest.importorskip("mlflow")
    import shutil

    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "run", f"file://{tmp_path}/mlruns"
    args = [*TINY, "train.max_steps=20", "train.log_every=4", "train.save_every=5", "train.keep_last=10",
            "track.mlflow=true", f"track.mlflow_uri={uri}", "track.experiment=pretune-resume"]
    # a stop part-way at 13 writes an interim loss (a partial interval), which the resume logs again whole
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", *args, "train.stop_after=13") == 0
    assert run_cli("pretrain", f"resume={out}", "train.stop_after=null") == 0
    # killed after step 20 was logged but before model/ and summary.json: resumed from step 10, the run
    # logs 12, 16 and 20 again, which its MLflow run already holds
    for d in (out / "checkpoints").iterdir():
        if int(d.name.split("-")[1]) > 10:
            shutil.rmtree(d)
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    assert run_cli("pretrain", f"resume={out}") == 0
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert sorted(losses) == [4, 8, 12, 16, 20]
    client = MlflowClient(tracking_uri=uri)
    run_id = (out / "mlflow_run_id").read_text().strip()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert [step for step, _ in history] == [4, 8, 12, 16, 20]  # was [4, 8, 12, 12, 13, 16, 16, 20, 20]
    assert dict(history) == pytest.approx(losses, rel=1e-6)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == [10, 20]
    assert client.get_run(run_id).data.metrics["summary/steps"] == 20


def test_a_tracker_without_its_package_is_a_config_error_that_says_the_fix(tmp_path, monkeypatch):
    from pretune.config import Config, TrackConfig
    from pretune.errors import ConfigError
    from pretune.train.tracking import open_trackers

    monkeypatch.setitem(sys.modules, "mlflow", None)  # "import mlflow" now raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = Config(track=TrackConfig(tensorboard=True, mlflow=True))
    with pytest.raises(ConfigError) as err:
        open_trackers(cfg, tmp_path, enabled=True)
    assert err.value.problems[0].startswith("track.tensorboard=true needs torch.utils.tensorboard")
    assert err.value.problems[1].startswith("track.mlflow=true needs mlflow")
    assert all("pip install 'pretune[track]'" in p for p in err.value.problems)
    assert open_trackers(cfg, tmp_path, enabled=False) == []  # ranks other than 0 never track
    assert open_trackers(Config(), tmp_path, enabled=True) == []


def test_trackers_skip_non_numbers_and_mark_a_failed_run(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from pretune.config import Config, TrackConfig
    from pretune.train.tracking import open_trackers

    uri = f"file://{tmp_path}/mlruns"
    cfg = Config(out_dir=str(tmp_path / "run"), track=TrackConfig(tensorboard=True, mlflow=True, mlflow_uri=uri))
    trackers = open_trackers(cfg, tmp_path / "run", enabled=True)
    for t in trackers:
        t.log({"step": 1, "loss": 2.5, "note": "text", "converged": True, "lr": None, "tokens": 256})
        t.close(None)  # the run failed: no summary
    assert sorted(_tensorboard_scalars(tmp_path / "run" / "tensorboard")) == ["loss", "tokens"]
    run = MlflowClient(tracking_uri=uri).get_run((tmp_path / "run" / "mlflow_run_id").read_text().strip())
    assert run.data.metrics == {"loss": 2.5, "tokens": 256.0} and run.info.status == "FAILED"


def test_an_error_inside_training_ends_the_mlflow_run_as_failed(tmp_path, corpus, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    import pretune.stages

    def broken_eval(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(pretune.stages, "lm_metrics", broken_eval)
    out, uri = tmp_path / "run", f"file://{tmp_path}/mlruns"
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", "train.max_steps=20", *TINY,
                "track.mlflow=true", f"track.mlflow_uri={uri}")
    run = MlflowClient(tracking_uri=uri).get_run((out / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FAILED"  # not left RUNNING
    assert run.data.metrics["loss"] > 0  # the steps before the error were logged
