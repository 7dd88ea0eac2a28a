"""How long task examples are: a verbalizer prompt is cut alike whatever its gold label, and so
that every label fits after it; a preference pair is as long as its longer sequence, and both of its
answers follow the same prompt."""

from __future__ import annotations

import pytest
import torch

from pretune.config import Config, FinetuneConfig, TrainConfig
from pretune.data import tasks as T
from pretune.data.tokenizer import train_char

LABELS = ["negative", "pos"]


@pytest.fixture
def tok():
    return train_char(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?<|>[]/_:\n"])


def verbalizer(max_len: int) -> Config:
    return Config(task="classification", finetune=FinetuneConfig(classifier="verbalizer", max_len=max_len))


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_verbalizer_prompt_is_cut_alike_whatever_the_gold_label(tok, side):
    cfg = verbalizer(40)
    cfg.finetune.truncation = side
    text = "the cat sat on the mat " * 4
    stats = T.TaskStats()
    neg, pos = T.encode([{"text": text, "label": "negative"}, {"text": text, "label": "pos"}], cfg, tok, LABELS, stats)
    assert neg["prompt"] == pos["prompt"] and stats.truncated == 2  # the prompt does not give the label away
    longest = max(len(tok.encode(" " + lab)) + 1 for lab in LABELS)
    assert len(neg["prompt"]) + longest == 40 and len(neg["ids"]) == 40 and len(pos["ids"]) < 40
    assert pos["ids"][len(pos["prompt"]):] == tok.encode(" pos") + [tok.eos_id]
    short = T.encode([{"text": "a cat", "label": "pos"}], cfg, tok, LABELS, stats)[0]
    assert stats.truncated == 2 and tok.decode(short["prompt"]) == T.verbalizer_prompt("a cat")


def test_verbalizer_scoring_fits_every_label_in_the_context(tok):
    from pretune.eval.scoring import evaluate_task
    from pretune.model.config import ModelConfig, resolve_model_config
    from pretune.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=tok.vocab_size, max_seq_len=48)))
    cfg = verbalizer(model.cfg.max_seq_len)  # what prompting does: the model's whole context
    examples = T.encode([{"text": "the cat sat on the mat " * 5, "label": "pos"}], cfg, tok, LABELS, T.TaskStats())
    figures = evaluate_task(model, examples, cfg, tok, LABELS, torch.device("cpu"))
    assert 0 <= figures["accuracy"] <= 1


def test_a_verbalizer_label_longer_than_max_len_is_named(tok):
    from pretune.data.sources import DataError

    with pytest.raises(DataError, match="label 'negative'.*max_len=8"):
        T.encode([{"text": "a cat", "label": "pos"}], verbalizer(8), tok, LABELS, T.TaskStats())


def pair(prompt_words: int, chosen: str, rejected: str) -> dict:
    return {"prompt": "the cat sat on the mat " * prompt_words, "chosen": chosen, "rejected": rejected}


def test_a_preference_pair_is_as_long_as_its_longer_sequence(tok):
    cfg = Config(task="preference", finetune=FinetuneConfig(max_len=96), train=TrainConfig(batch_size=2))
    stats = T.TaskStats()
    examples = T.encode([pair(1, "the quick brown fox jumps", "a lazy dog while the bird"),
                         pair(1, "ok", "no")], cfg, tok, None, stats)
    lengths = [[len(p) + len(a) for p, a in (e["chosen"], e["rejected"])] for e in examples]
    assert stats.truncated == 0 and sum(lengths[0]) > 96  # each sequence fits, the two together do not
    assert [T.length_of(e) for e in examples] == [max(n) for n in lengths]
    assert T.TaskBatches(examples, cfg, tok.pad_id).seq_len == max(lengths[0]) <= 96


@pytest.mark.parametrize("side", ["left", "right"])
def test_both_answers_of_a_pair_follow_the_same_prompt(tok, side):
    cfg = Config(task="preference", finetune=FinetuneConfig(max_len=64, truncation=side))
    stats = T.TaskStats()
    (e,) = T.encode([pair(5, "a fox", "the lazy dog sits on the mat")], cfg, tok, None, stats)
    (p, chosen), (q, rejected) = e["chosen"], e["rejected"]
    assert p == q and len(p) + len(rejected) == 64 and len(p) + len(chosen) < 64
    assert stats.truncated == 1  # one pair, counted once
    # an answer too long by itself loses its end (to half of max_len); the prompt is still shared
    (e,) = T.encode([pair(5, "a fox", "the lazy dog sits on the mat " * 4)], cfg, tok, None, stats)
    (p, chosen), (q, rejected) = e["chosen"], e["rejected"]
    assert p == q and len(rejected) == 32 and len(p) + len(rejected) == 64 and stats.truncated == 2


def test_task_scoring_leaves_the_model_in_the_mode_it_found():
    from pathlib import Path

    import torch

    from pretune.config import Config, load_config
    from pretune.data import tasks as T
    from pretune.data.tokenizer import train_char
    from pretune.eval.scoring import evaluate_task
    from pretune.model.config import ModelConfig, resolve_model_config
    from pretune.model.gpt import GPT

    tok = train_char(["what is one? it is one. what is two? it is two."])
    cfg = load_config(Config, None, ["task=instruction", "finetune.max_len=48"])
    record = T.normalise({"prompt": "what is one?", "response": "it is one."}, "instruction", cfg.data,
                         Path("qa.jsonl"), 1)
    examples = T.encode([record], cfg, tok, None, T.TaskStats())
    model = GPT(resolve_model_config(ModelConfig(preset="tiny"), tok.vocab_size))
    for training in (False, True):
        model.train(training)
        assert evaluate_task(model, examples, cfg, tok, None, torch.device("cpu"))["loss"] > 0
        assert model.training is training


@pytest.mark.parametrize("classifier", ["head", "verbalizer"])
def test_classification_text_starts_with_the_bos_the_tokenizer_adds_whatever_the_cut(classifier):
    from tokenizers import processors

    from pretune.config import Config, load_config
    from pretune.data import tasks as T
    from pretune.data.tokenizer import Tokenizer, train_char

    plain = train_char(["the cat sat on the mat, a dog ran. pos neg"])
    llama = train_char(["the cat sat on the mat, a dog ran. pos neg"])
    llama.tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                             special_tokens=[("<|bos|>", llama.bos_id)])
    llama = Tokenizer(llama.tok)
    cfg = load_config(Config, None, ["task=classification", f"finetune.classifier={classifier}",
                                     "finetune.max_len=24", "finetune.truncation=left"])
    records = [{"text": "the cat sat on the mat " * 4, "label": "pos"}, {"text": "a dog ran", "label": "neg"}]
    for tok in (plain, llama):
        stats = T.TaskStats()
        examples = T.encode(records, cfg, tok, ["pos", "neg"], stats)
        assert stats.truncated == 1 and all(len(e["ids"]) <= 24 for e in examples)
        starts = [e["ids"][0] for e in examples]
        if tok is llama:
            assert starts == [tok.bos_id, tok.bos_id]  # the long text is cut from the left, its BOS kept
        else:
            assert tok.bos_id not in starts  # pretune's own tokenizers add none
