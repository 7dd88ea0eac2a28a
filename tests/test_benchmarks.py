"""The benchmark scripts run and measure what they claim (tiny sizes; the figures live in
benchmarks/results/)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    if str(BENCH) not in sys.path:  # the scripts import their shared helpers as `_common`
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_throughput_runs_on_cpu_for_correctness(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "gpu_throughput.py"), "--device", "cpu", "--preset", "tiny",
                        "--steps", "2", "--vocab", "512", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_throughput.json").read_text())
    step, loop = data["results"]  # the bare step, then the same model through pretune's loop
    from pretune.model.config import ModelConfig, count_params, resolve_model_config

    assert (step["via"], loop["via"]) == ("step", "loop")
    for res in (step, loop):
        assert res["params"] == count_params(resolve_model_config(ModelConfig(preset="tiny"), 512))["total"]
        assert res["tokens_per_s"] > 0 and res["steps"] == 2 and res["precision"] == "fp32" and res["mfu"] is None
        assert abs(res["loss"] - math.log(512)) < 0.5  # random tokens: the loss starts at ln(vocab)
        assert res["tflops"] == pytest.approx(res["flops_per_token"] * res["tokens_per_s"] / 1e12)
    assert loop["flops_per_token"] == step["flops_per_token"]  # the loop's meter counts the bench's FLOPs
    md = (tmp_path / "gpu_throughput.md").read_text()
    assert "| tiny | bare step |" in md and "| tiny | pretune's loop |" in md and data["environment"]["date"] in md


def test_gpu_throughput_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, str(BENCH / "gpu_throughput.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--device cpu" in r.stderr


def test_cpu_throughput_compares_the_same_model(tmp_path):
    pytest.importorskip("transformers", reason="the comparison needs Hugging Face transformers")
    b = load("cpu_throughput")
    tok, data = b.load_data(tmp_path)
    check = b.check_same_model(tok, data)
    assert check["params"][0] == check["params"][1]
    assert abs(check["pretune_loss"] - check["hf_loss"]) < 1e-3  # same architecture, same weights
    runners = b.runners(tok, data, tmp_path)
    for name in b.NAMES:
        times = runners[name].run(3)
        assert len(times) == 3 and all(t > 0 for t in times), name
    fake = {n: [0.05, 0.06, 0.07] for n in b.NAMES}
    res = {"date": "today", "machine": b.machine(), "torch": "x", "transformers": "y", "threads": 2, "steps": 3,
           "rounds": 1, "skip": 0, "check": check, "throughput": b.summarise(fake, b.BENCH.tokens_per_step),
           "memory": {n: {"baseline_rss": 1 << 20, "peak_rss": 3 << 20} for n in b.NAMES}, "argv": []}
    b.write_results(res, tmp_path / "out")
    md = (tmp_path / "out" / "cpu_throughput.md").read_text()
    assert "pretune / faster HF trainer: 1.00x" in md and "+2.0 MiB" in md


def test_lora_peft_compares_the_same_adapters(tmp_path):
    pytest.importorskip("peft", reason="the comparison needs peft")
    b = load("lora_peft")
    import _common as common  # on the path once a benchmark script is loaded
    bench = common.Bench(arch=dict(common.CHAR_ARCH, n_layer=1, max_seq_len=16), batch=2, seq=16, lora=b.LORA)
    tok, data = common.load_data(tmp_path, bench.seq, bench.batch)
    check = common.check_same_model(bench, tok, data)
    assert check["params"][0] == check["params"][1]
    # four adapted 128 x 128 projections with rank 8: 4 * (8 * 128 + 128 * 8) trainable on each side
    assert check["trainable"] == (8192, 8192)
    assert abs(check["pretune_loss"] - check["hf_loss"]) < 1e-5  # the adapters start at zero
    runners = common.runners(bench, tok, data, tmp_path)
    for name in b.NAMES:
        times = runners[name].run(2)
        assert len(times) == 2 and all(t > 0 for t in times), name
    tps = bench.tokens_per_step
    throughput = common.summarise({"pretune": [0.05] * 3, "HF + plain loop": [0.1] * 3, "HF Trainer": [0.08] * 3}, tps)
    memory = {"pretune": {"baseline_rss": 1 << 20, "peak_rss": 3 << 20},
              "HF + plain loop": {"baseline_rss": 1 << 20, "peak_rss": 5 << 20},
              "HF Trainer": {"baseline_rss": 1 << 20, "peak_rss": 9 << 20}}
    r = {"check": check, "throughput": throughput, "memory": memory, "ratios": b.ratios(throughput, memory)}
    assert r["ratios"] == {"speed": pytest.approx(1.6), "memory": pytest.approx(0.5)}
    res = {"date": "today", "machine": common.machine(), "torch": "x", "transformers": "y", "peft": "z",
           "threads": 1, "steps": 3, "rounds": 1, "skip": 0, "models": {"shakespeare-char": r}, "argv": []}
    b.write_results(res, tmp_path / "out")
    md = (tmp_path / "out" / "lora_peft.md").read_text()
    assert "1.60x tokens/s" in md and "0.50x" in md and "(target: >= 1.5x faster and less memory: met)" in md


def test_lora_instruction_counts_real_tokens_on_both_sides(tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="the comparison needs peft")
    b = load("lora_instruction")
    monkeypatch.setattr(b, "ARCH", dict(b.ARCH, n_layer=1, d_model=64, n_head=2, n_kv_head=2, d_ff=128))
    monkeypatch.setattr(b, "BITEXT", tmp_path / "absent")  # the generated world's support task
    data = b.prepare(tmp_path, 40)
    assert "generated world" in data["source"]
    exs, _ = b.examples(tmp_path)
    lengths = sorted(len(e["ids"]) - 1 for e in exs)
    assert len(exs) == 40 and lengths[0] < lengths[-1]  # records of different lengths
    most = sum(lengths[-b.BATCH:])  # no step can hold more real tokens than the longest batch
    for name, (times, tokens) in {"pretune": b.run_pretune(tmp_path, 3),
                                  "HF Trainer": b.run_hf_trainer(tmp_path, 3, "group_by_length")}.items():
        assert len(times) == len(tokens) == 3 and all(t > 0 for t in times), name
        assert all(sum(lengths[:b.BATCH]) <= n <= most for n in tokens), (name, tokens)
    s = {"pretune": {"tokens_per_s": 300.0, "steps": 3, "tokens_per_step": 900.0, "training_rss": 2 << 20},
         "HF Trainer": {"tokens_per_s": 150.0, "steps": 3, "tokens_per_step": 900.0, "training_rss": 8 << 20},
         "HF Trainer (group_by_length)": {"tokens_per_s": 200.0, "steps": 3, "tokens_per_step": 900.0,
                                          "training_rss": 4 << 20}}
    res = {"date": "today", "machine": "m", "torch": "x", "transformers": "y", "peft": "z", "threads": 1,
           "steps": 3, "skip": 0, "rounds": 1, "source": data["source"], "vocab": data["vocab"], "results": s,
           "argv": []}
    b.write_results(res, tmp_path / "out")
    md = (tmp_path / "out" / "lora_instruction.md").read_text()
    assert "1.50x real tokens/s" in md and "0.50x**" in md and "target >= 1.5x faster: met" in md


def test_recorded_command_leaves_out_where_results_went_and_notes():
    common = load("_common")
    argv = ["--threads", "2", "--out", "somewhere/else", "--notes", "a paragraph", "--rounds=3", "--out=x"]
    assert common.run_argv(argv) == ["--threads", "2", "--rounds=3"]
