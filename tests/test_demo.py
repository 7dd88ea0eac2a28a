"""`pretune demo`: the main job end to end at a small scale (quick=true), and continued when re-run."""

import json

from conftest import run_cli


def test_quick_demo_writes_the_report_and_continues(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    args = ["demo", "quick=true", "seeds=1", "parallel=1", "pretrain_steps=16", "cpt_steps=4", "device=cpu",
            "out_dir=demo"]  # relative: the study file must still work from elsewhere
    assert run_cli(*args) == 0
    study = out / "study"
    results = json.loads((study / "results.json").read_text())
    assert set(results["tasks"]) == {"facts_qa", "reviews"}
    assert all(r["status"] == "completed" for r in results["runs"])
    assert {r["arm"] for r in results["runs"]} == {"scratch", "full", "lora", "cpt+full", "zero-shot", "few-shot"}
    html = (study / "report.html").read_text()
    assert "data:image/png;base64," in html and "facts_qa" in html
    assert (out / "demo-study.yaml").is_file() and (out / "world" / "bias_pairs.csv").is_file()
    capsys.readouterr()
    assert run_cli(*args) == 0  # a second run finds everything finished
    log = capsys.readouterr().out
    assert "continuing the demo" in log and " 0 to run" in log
    assert run_cli(*[a if a != "seeds=1" else "seed=5" for a in args]) != 0  # another world: refused
    assert "other settings" in capsys.readouterr().err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the study file names its data wherever it is run from
    assert run_cli("study", str(out / "demo-study.yaml")) == 0
    assert " 0 to run" in capsys.readouterr().out
