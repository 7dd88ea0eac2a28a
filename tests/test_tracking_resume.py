"""Trackers in the cases that used to break them: MLflow with several pre-training sources (val_loss
beside val_loss/a.txt), a tracker that fails part-way (a warning, and training goes on), and
TensorBoard after a resume at the last checkpoint or with another train.log_every."""

import json
import math

import pytest
from conftest import TINY, make_corpus, read_metrics, run_cli

SHORT = [*TINY, "train.max_steps=12", "train.eval_every=6", "train.save_every=5", "train.keep_last=5",
         "train.eval_tokens=512"]


def _tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _series(run_dir) -> dict[str, dict[int, float]]:
    """Every figure of metrics.jsonl by step, as a tracker should hold it."""
    out: dict[str, dict[int, float]] = {}
    for record in read_metrics(run_dir):
        assert not record.get("interim")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, {})[record["step"]] = float(value)
    return out


def _assert_same(tracked: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    assert sorted(tracked) == sorted(want)
    for key, points in want.items():
        assert sorted(tracked[key]) == sorted(points), key  # the same steps, none missing or left over
        for step, value in points.items():
            assert tracked[key][step] == pytest.approx(value, rel=1e-5, abs=1e-12), (key, step)


def test_mlflow_tracks_a_run_with_two_sources_under_dotted_keys(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    a, b = make_corpus(tmp_path / "a.txt", lines=600), make_corpus(tmp_path / "b.txt", lines=600, seed=1)
    out, uri = tmp_path / "run", f"file://{tmp_path}/mlruns"
    assert run_cli("pretrain", f"data.train=[{a},{b}]", "data.weights=[0.7,0.3]", f"out_dir={out}", *SHORT,
                   "track.mlflow=true", f"track.mlflow_uri={uri}", "track.experiment=two-sources") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and "val_loss/a.txt" in summary
    want = _series(out)
    assert {"val_loss", "val_loss/a.txt", "val_bpb/b.txt"} <= want.keys()

    client = MlflowClient(tracking_uri=uri)
    run_id = (out / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    tracked = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
               for k in run.data.metrics if not k.startswith("summary/")}
    _assert_same(tracked, {k.replace("/", "."): v for k, v in want.items()})
    assert run.data.metrics["summary/val_loss.a.txt"] == pytest.approx(summary["val_loss/a.txt"])
    assert run.data.metrics["summary/val_loss"] == pytest.approx(summary["val_loss"])


def test_a_tracker_that_fails_is_dropped_with_a_warning_and_training_goes_on(tmp_path, corpus, monkeypatch,
                                                                             capsys):
    pytest.importorskip("mlflow")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pretune.train import tracking

    calls = []
    real = tracking.MLflowTracker._log_metrics

    def flaky(self, items, step, again=True):
        calls.append(step)
        if len(calls) == 3:
            raise MlflowException("the tracking server went away")
        return real(self, items, step, again)

    monkeypatch.setattr(tracking.MLflowTracker, "_log_metrics", flaky)
    out, uri = tmp_path / "run", f"file://{tmp_path}/mlruns"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", *SHORT, "track.mlflow=true",
                   f"track.mlflow_uri={uri}") == 0
    assert "warning: MLflow tracking failed and is off for the rest of the run" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13))  # metrics.jsonl has every step
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert (out / "model" / "model.safetensors").is_file()
    assert len(calls) == 3  # dropped at once: not called again
    run_id = (out / "mlflow_run_id").read_text().strip()
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FAILED"  # what it holds is not the whole run
    assert sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")) == [1, 2]


class Killed(Exception):
    """Stands for a kill at a chosen point (the process dies; here an exception ends the run)."""


def test_tensorboard_keeps_the_last_steps_when_a_run_resumes_at_its_final_checkpoint(tmp_path, corpus,
                                                                                     monkeypatch):
    pytest.importorskip("tensorboard")
    from pretune.train import loop

    def killed(*args, **kwargs):
        raise Killed("after the final checkpoint, before model/")

    out = tmp_path / "run"
    args = [f"data.train={corpus}", *SHORT, "train.log_every=4", "track.tensorboard=true"]
    assert run_cli("pretrain", *args, f"out_dir={tmp_path / 'ref'}") == 0  # uninterrupted, for comparison
    with monkeypatch.context() as m:
        m.setattr(loop, "save_model_dir", killed)
        with pytest.raises(Killed):
            run_cli("pretrain", *args, f"out_dir={out}")
    assert (out / "checkpoints" / "step-000012").is_dir() and not (out / "summary.json").exists()
    assert run_cli("pretrain", f"resume={out}") == 0
    want = _series(out)
    timing = ("tokens_per_s", "wall_s")
    assert {k: v for k, v in want.items() if k not in timing} == {
        k: v for k, v in _series(tmp_path / "ref").items() if k not in timing}
    scalars = _tensorboard_scalars(out / "tensorboard")
    _assert_same({k: v for k, v in scalars.items() if not k.startswith("summary/")}, want)
    assert max(scalars["loss"]) == 12 and 12 in scalars["val_loss"]  # the final step's points are there
    assert scalars["summary/steps"] == {12: 12.0}


def test_tensorboard_after_a_resume_with_another_log_every_holds_what_metrics_jsonl_holds(tmp_path, corpus,
                                                                                          monkeypatch):
    pytest.importorskip("tensorboard")
    from pretune.train import checkpoint as ck

    real, saved = ck.save_checkpoint, []

    def save_then_die(run_dir, step, *args, **kwargs):
        if step == 10:  # steps 6..10 are logged; the checkpoint at 5 is the last one
            raise Killed("before the checkpoint at step 10")
        saved.append(step)
        return real(run_dir, step, *args, **kwargs)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(ck, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", *SHORT, "train.log_every=1",
                    "train.eval_every=12", "track.tensorboard=true")
    assert saved == [5]
    assert run_cli("pretrain", f"resume={out}", "train.log_every=4") == 0  # logs 8 and 12, not 6, 7, 9...
    want = _series(out)
    assert sorted(want["loss"]) == [1, 2, 3, 4, 5, 8, 12]
    scalars = _tensorboard_scalars(out / "tensorboard")
    _assert_same({k: v for k, v in scalars.items() if not k.startswith("summary/")}, want)
    assert all(math.isfinite(v) for v in scalars["loss"].values())
