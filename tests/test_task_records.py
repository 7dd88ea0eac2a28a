"""Task records: malformed records skipped or named by file and line, JSONL line breaks, canonical
labels, the prompt/response split of templates that rewrite the history, preference pairs through
the chat template, and template variables as transformers passes them."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("jinja2", reason="chat templates need jinja2 (the hf or eval extra)")

from pretune.config import Config, DataConfig  # noqa: E402
from pretune.data.sources import DataError, iter_records  # noqa: E402
from pretune.data.tasks import TaskStats, encode, normalise, read_records  # noqa: E402
from pretune.data.templates import ChatTemplateError, render_chat, render_prompt_response  # noqa: E402
from pretune.data.tokenizer import train_char  # noqa: E402

GOOD = [{"text": "good movie", "label": "pos"}, {"text": "bad movie", "label": "neg"}]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Writes "[final]" before the last turn of a finished conversation only: the history rendered with
# the generation prompt is not a prefix of the full conversation.
FINAL_MARK = ("{{ bos_token }}{% for m in messages %}{% if loop.last and not add_generation_prompt and "
              "m['role']=='assistant' %}[final]{% endif %}<{{ m['role'] }}>{{ m['content'] }}</turn>\n"
              "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def tok():
    return train_char(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?<|>[]/_\n"])


def lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def read(path, task="classification", on_error="skip", **fields):
    stats = TaskStats()
    d = DataConfig(on_error=on_error, **fields)
    return read_records([str(path)], task, d, stats, "data.train"), stats


@pytest.mark.parametrize("name, body, where", [
    ("bad.jsonl", lines(GOOD[0], '{"text": "x", "label": "pos"', GOOD[1]), r"bad.jsonl:2: not valid JSON"),
    ("arr.jsonl", lines(GOOD[0], '["a", "b"]', GOOD[1]), r"arr.jsonl:2: expected a JSON object"),
    ("extra.csv", "text,label\ngood,pos\nbad,neg,extra\nok,neg\n", r"extra.csv:3: more fields than the header"),
])
def test_unreadable_lines_are_skipped_and_counted_or_named(tmp_path, name, body, where):
    f = tmp_path / name
    f.write_text(body, encoding="utf-8")
    records, stats = read(f)
    assert len(records) == 2 and stats.skipped == 1 and stats.errors[0].startswith(str(tmp_path))
    with pytest.raises(DataError, match=where):
        read(f, on_error="fail")
    with pytest.raises(DataError, match=where):  # without a callback the reader still stops there
        list(iter_records(f))


@pytest.mark.parametrize("bad, field", [
    ({"role": "bot", "content": "hi"}, r"messages\[0\].role is 'bot'"),
    ({"role": "user", "content": 5}, r"messages\[0\].content must be a string"),
])
def test_bad_messages_name_file_line_and_field_and_are_skipped(tmp_path, bad, field):
    f = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]}
    f.write_text(lines(good, {"messages": [bad, {"role": "assistant", "content": "red"}]}, good))
    records, stats = read(f, task="instruction")
    assert len(records) == 2 and stats.skipped == 1
    with pytest.raises(DataError, match=rf"chat.jsonl:2: field 'messages': {field}"):
        read(f, task="instruction", on_error="fail")


def test_unknown_label_names_file_and_line(tmp_path, tok):
    f = tmp_path / "cls.jsonl"
    f.write_text(lines(*GOOD, {"text": "so so", "label": "mixed"}))
    records, _ = read(f, on_error="fail")
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(f.read_bytes())
    assert read(copy, on_error="fail")[0] == records  # where a record was read is not one of its fields
    with pytest.raises(DataError, match=r"cls.jsonl:3: label 'mixed' is not among the training labels"):
        encode(records, Config(task="classification"), tok, ["neg", "pos"], TaskStats())


def test_jsonl_splits_on_newline_only(tmp_path):
    f = tmp_path / "seps.jsonl"
    text = "a\u2028b\u2029c\u0085d"
    body = lines(GOOD[0], json.dumps({"text": text, "label": "pos"}, ensure_ascii=False), GOOD[1])
    f.write_bytes(body.replace("\n", "\r\n").encode("utf-8"))
    records = list(iter_records(f))
    assert [line for line, _ in records] == [1, 2, 3]
    assert records[1][1]["text"] == text and records[2][1]["label"] == "neg"


def test_labels_are_canonical_class_names(tmp_path):
    d, where = DataConfig(), (tmp_path / "x.jsonl", 1)
    labels = [normalise({"text": "t", "label": v}, "classification", d, *where)["label"]
              for v in ("pos ", " pos", 1, 1.0, 0.5, True, False)]
    assert labels == ["pos", "pos", "1", "1", "0.5", "true", "false"]
    f = tmp_path / "c.csv"
    f.write_text("text,label\ngood,pos \nbad, neg\n")
    assert [r["label"] for r in read(f, on_error="fail")[0]] == ["pos", "neg"]


def test_split_of_a_template_that_rewrites_the_history(tok):
    tok.chat_template = FINAL_MARK
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "t"}]
    prompt, response = render_prompt_response(messages, tok)
    assert prompt == "<|bos|><user>hi there</turn>\n[final]<assistant>" and response == "t</turn>\n"
    assert prompt + response == render_chat(messages, tok, add_generation_prompt=False)


def test_split_refuses_a_template_that_gives_no_certain_split(tok):
    # the history is rewritten and the answer is written twice: a split at either copy would leave
    # the answer in the prompt (searching for the text put it there), so the template is refused
    tok.chat_template = ("{% for m in messages %}{% if not add_generation_prompt %}!{% endif %}<{{ m['content'] }}>"
                         "{% endfor %}{% if not add_generation_prompt %}({{ messages[-1]['content'] }}){% endif %}")
    with pytest.raises(ChatTemplateError, match="cannot be split into prompt and response"):
        render_prompt_response([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tok)


def test_preference_answers_end_like_instruction_responses(tok):
    tok.chat_template = CHATML
    pair = encode([{"prompt": "name a colour", "chosen": "green", "rejected": "cat"}],
                  Config(task="preference"), tok, None, TaskStats())[0]
    inst = encode([{"messages": [{"role": "user", "content": "name a colour"},
                                 {"role": "assistant", "content": "green"}]}],
                  Config(task="instruction"), tok, None, TaskStats())[0]
    prompt, chosen = pair["chosen"]
    assert prompt == inst["prompt"] and prompt + chosen == inst["ids"]
    assert tok.decode(chosen, skip_special=False) == "green<|im_end|>\n<|eos|>"
    assert tok.decode(pair["rejected"][1], skip_special=False) == "cat<|im_end|>\n<|eos|>"


def test_template_sees_tojson_and_special_tokens_as_in_transformers(tok):
    tok.tok.add_special_tokens(["<|tool|>"])
    tok.chat_template = ("{{ pad_token }}{{ unk_token }}{{ additional_special_tokens | join(',') }}"
                         "{% for m in messages %}{{ m.content | tojson }}"
                         "{{ m | tojson(indent=1, sort_keys=true) }}{% endfor %}")
    text = render_chat([{"role": "user", "content": "Hi <there> & é"}], tok, add_generation_prompt=False)
    assert text == ('<|pad|><|unk|><|tool|>"Hi <there> & é"'
                    + json.dumps({"content": "Hi <there> & é", "role": "user"}, indent=1, ensure_ascii=False))


def test_the_generation_prompt_does_not_depend_on_the_reference_answer(tok):
    from pretune.config import FinetuneConfig

    cfg = Config(task="instruction", finetune=FinetuneConfig(max_len=24))
    prompt = "please describe the weather in some detail"
    recs = [normalise({"prompt": prompt, "response": answer}, "instruction", DataConfig(), "f.jsonl", 1)
            for answer in ("ok", "a long answer that takes up most of the room there is")]
    short, long = encode(recs, cfg, tok, None, TaskStats())
    assert len(long["prompt"]) < len(short["prompt"])  # training cuts the prompt to fit the answer
    assert short["gen_prompt"] == long["gen_prompt"] and len(long["gen_prompt"]) > 24  # generation does not


@pytest.mark.parametrize("template", [None, CHATML], ids=["default", "chatml"])
def test_loss_on_every_assistant_turn_or_the_last(tok, template):
    from pretune.config import FinetuneConfig

    tok.chat_template = template
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": "and now"}, {"role": "assistant", "content": "bye"}]
    rec = normalise({"messages": messages}, "instruction", DataConfig(), "f.jsonl", 1)

    def trained(turns, max_len=256):
        stats = TaskStats()
        [e] = encode([rec], Config(task="instruction", finetune=FinetuneConfig(turns=turns, max_len=max_len)),
                     tok, None, stats)
        runs, run = [], []
        for t, m in zip(e["ids"], e["mask"]):
            if m:
                run.append(t)
            elif run:
                runs, run = runs + [tok.decode(run)], []
        return runs + ([tok.decode(run)] if run else []), e, stats.truncated

    last, e_last, _ = trained("last")
    every, e_all, _ = trained("all")
    assert len(last) == 1 and last[0].startswith("bye") and "hi there" not in last[0]
    assert len(every) == 2 and every[0].startswith("hi there") and every[1] == last[0]
    assert not any("hello" in r or "and now" in r for r in every)  # user turns stay masked
    assert sum(e_all["mask"]) > sum(e_last["mask"]) and e_all["gen_prompt"] == e_last["gen_prompt"]
    # truncation keeps the last answer and cuts the history with its mask
    cut, e_cut, truncated = trained("all", max_len=len(e_all["ids"]) - 3)
    assert truncated == 1 and len(e_cut["ids"]) == len(e_all["ids"]) - 3 and cut[-1] == last[0]


@pytest.mark.parametrize("n, micro", [(33, 2), (37, 2), (37, 1), (1, 1)])
def test_every_rank_gets_as_many_micro_batches(n, micro):
    from pretune.config import TrainConfig
    from pretune.data.tasks import TaskBatches

    cfg = Config(task="instruction", train=TrainConfig(batch_size=8, micro_batch_size=micro))
    examples = [{"ids": list(range(2 + i % 5)), "mask": [1] * (2 + i % 5)} for i in range(n)]
    data = TaskBatches(examples, cfg, pad_id=0)
    sizes = []
    for step in range(2 * data.steps_per_epoch):
        alone = sum(len(mb["input_ids"]) for mb in data.micro_batches(step, 0, 1))
        sizes.append(alone)
        for world in (2, 3):
            counts = [[len(mb["input_ids"]) for mb in data.micro_batches(step, r, world)] for r in range(world)]
            assert all(c == counts[0] for c in counts) and counts[0], (step, world, counts)
            assert sum(map(sum, counts)) >= alone  # filled up from the epoch's start, nothing dropped
    assert sorted(sizes) == sorted(2 * ([8] * (n // 8) + ([n % 8] if n % 8 else [])))  # one process: as planned


@pytest.mark.parametrize("task, classifier", [("instruction", "head"), ("classification", "head"),
                                              ("classification", "verbalizer"), ("preference", "head")])
def test_filler_rows_of_a_short_batch_carry_no_weight(task, classifier):
    """13 examples in batches of 4 leave a last batch of 1: 3 ranks fill it up to 3 rows from the
    epoch's start, and the step's summed loss and target count over the ranks are one process's."""
    import torch

    from pretune.config import FinetuneConfig, TrainConfig
    from pretune.data.tasks import TaskBatches
    from pretune.model.config import ModelConfig, resolve_model_config
    from pretune.model.gpt import GPT
    from pretune.model.heads import ClassifierModel
    from pretune.train.objectives import ClassifierObjective, DPOObjective, LMObjective

    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=30))).eval()
    if task == "preference":
        examples = [{"chosen": ([1, 2 + i % 3], [5, 6, 7]), "rejected": ([1, 2 + i % 3], [8, 9])} for i in range(13)]
        objective = DPOObjective(model, beta=0.5)
        with torch.no_grad():  # a policy that differs from its reference, so every pair has a loss
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    else:
        examples = [{"ids": [1] + [2 + (i * 7 + j) % 20 for j in range(3 + i % 4)], "label": i % 2} for i in range(13)]
        for e in examples:
            e["mask"] = [0, 0] + [1] * (len(e["ids"]) - 2)
        objective = LMObjective()
        if classifier == "head" and task == "classification":
            model = ClassifierModel(model, n_classes=2).eval()
            objective = ClassifierObjective()
    cfg = Config(task=task, train=TrainConfig(batch_size=4, micro_batch_size=1),
                 finetune=FinetuneConfig(classifier=classifier))
    data = TaskBatches(examples, cfg, pad_id=0)
    short = next(s for s in range(data.steps_per_epoch) if len(data._plan(0)[s]) == 1)

    def step(world):
        with torch.no_grad():
            mbs = [mb for r in range(world) for mb in data.micro_batches(short, r, world)]
            return sum(float(objective(model, mb)) for mb in mbs), sum(objective.count(mb) for mb in mbs), len(mbs)

    (loss1, n1, mb1), (loss3, n3, mb3) = step(1), step(3)
    assert mb3 == 3 > mb1 == 1 and loss1 > 0  # the filler rows are computed ...
    assert n3 == n1 and loss3 == pytest.approx(loss1, rel=1e-6)  # ... and weigh nothing


def test_plain_text_is_not_read_as_task_records(tmp_path):
    from pretune.data.sources import DataError, iter_records

    f = tmp_path / "held.txt"
    f.write_text("Red brown a people over lazy quick\nthe second line\n")
    with pytest.raises(DataError, match=r"held.txt: task records come as JSONL, CSV or TSV.*task=lm"):
        list(iter_records(f))
