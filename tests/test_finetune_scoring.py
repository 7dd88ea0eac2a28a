"""A fine-tuned run's scoring, and `pretune evaluate` giving its figures again: examples longer than
the model's context (in any split) are cut to it rather than crash the scoring, and evaluate
generates as the run did (its max_new_tokens, every example)."""

from __future__ import annotations

import json

from conftest import FT, pretrain_base, run_cli


def test_long_examples_are_cut_to_the_context_and_evaluate_repeats_the_runs_figures(tmp_path, capsys):
    base = pretrain_base(tmp_path, lines=300, steps=5)  # the tiny preset: a context of 256 tokens
    short = [{"prompt": f"q{i % 4}", "response": f"the answer is {i % 4}"} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    # more test records than evaluate once generated for (200), those past 200 with other answers, and
    # one far longer than the context
    test = short * 8 + [{**r, "response": "no"} for r in short[:16]] + [{"prompt": "a fox " * 80, "response": "no"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    run = tmp_path / "ft"
    args = [a for a in FT if not a.startswith("finetune.max_len")]
    assert run_cli("finetune", f"init_from={base}", "task=instruction", f"data.train={tmp_path / 'train.jsonl'}",
                   f"data.test={tmp_path / 'test.jsonl'}", "finetune.max_len=4096", "finetune.max_new_tokens=4",
                   "train.max_steps=40", "optim.lr=1e-2", f"out_dir={run}", *args) == 0
    assert "examples are cut to 256 tokens" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["scored_on"] == "test"
    assert sum(1 for _ in open(run / "predictions.jsonl")) == len(test)
    out = tmp_path / "eval.json"
    assert run_cli("evaluate", str(run), f"data.val={tmp_path / 'test.jsonl'}", f"out={out}") == 0
    figures = json.loads(out.read_text())
    assert summary["chrf"] > 0  # answers were generated (and a longer generation would score otherwise)
    for key in ("exact_match", "chrf", "loss"):
        assert abs(figures[key] - summary[key]) <= 1e-4 * max(1.0, abs(summary[key])), (key, figures, summary)


def test_few_shot_prompts_keep_one_system_turn_first():
    """Demonstrations put in front of a record bring their turns, not their system messages: a
    template that allows a system message only first (Mistral's, Gemma's) renders every prompt."""
    from pretune.prompting import with_demonstrations

    def record(q, a, system=None):
        return {"messages": ([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    demos = [record("1+1?", "2", system="be brief"), record("2+2?", "4", system="be brief")]
    for rec, first in ((record("3+3?", "6", system="answer in digits"), "answer in digits"),
                       (record("3+3?", "6"), "be brief")):
        msgs = with_demonstrations(rec, demos, "instruction")["messages"]
        assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 and msgs[0]["content"] == first
        assert [m["content"] for m in msgs[1:]] == ["1+1?", "2", "2+2?", "4", "3+3?", "6"]
    assert with_demonstrations(record("3+3?", "6"), [record("1+1?", "2")], "instruction")["messages"][0]["role"] == "user"
