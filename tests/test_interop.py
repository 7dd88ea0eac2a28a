"""Hugging Face interoperability: import parity per architecture, export to transformers and PEFT,
loading a Hugging Face directory in place, and evaluation with lm-evaluation-harness (GGUF:
test_gguf.py).

Every model here is tiny and random (with weights spread wide enough that greedy decoding has no
near-ties); logits are compared in float32 with a tolerance of 1e-4.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from interop_models import LLAMA3, TEMPLATE, TOL, bpe, char, pretune_model, save_run, spread  # noqa: F401 (fixtures)
from safetensors.torch import load_file, save_file

from pretune.data.tokenizer import Tokenizer
from pretune.errors import UserError
from pretune.model.gpt import GPT
from pretune.model.io import load_model

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

def save_hf_tokenizer(tok: Tokenizer, directory: Path) -> None:
    """The tokenizer as transformers itself saves one (tokenizer_config.json, chat_template.jinja)."""
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        unk_token="<|unk|>", chat_template=tok.chat_template)
    fast.save_pretrained(directory)


def hf_model(kind: str, **kw):
    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-6)
    small.update(kw)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    return spread(cls[1](cls[0](**small, attn_implementation="eager")))


VARIANTS = {
    "llama3-rope-untied": ("llama", dict(rope_scaling=LLAMA3, rope_theta=10000.0, tie_word_embeddings=False)),
    "smollm-tied": ("llama", dict(tie_word_embeddings=True, rope_theta=100000.0)),
    "mistral-window": ("mistral", dict(sliding_window=48, head_dim=24)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers_logits(tmp_path, bpe, variant):
    kind, kw = VARIANTS[variant]
    ref = hf_model(kind, **kw)
    ref.save_pretrained(tmp_path / "hf")
    save_hf_tokenizer(bpe, tmp_path / "hf")
    assert run_cli("import", tmp_path / "hf", tmp_path / "pt") == 0
    raw = json.loads((tmp_path / "pt" / "config.json").read_text())
    assert raw["pretune_format"] == 1 and raw["tie_embeddings"] == kw.get("tie_word_embeddings", False)
    model, tok = load_model(tmp_path / "pt")
    assert model.cfg.qkv_bias == (kind == "qwen2")
    assert model.cfg.max_seq_len == (48 if kind == "mistral" else 256)  # capped to the sliding window
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        diff = (model(idx) - ref(idx).logits).abs().max().item()
    assert diff <= TOL, f"{variant}: max |logit diff| {diff}"
    assert tok.encode("the quick fox") == bpe.encode("the quick fox")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    assert tok.chat_template == TEMPLATE
    # Back out again: the exported tensors are the original ones.
    assert run_cli("export", tmp_path / "pt", tmp_path / "back") == 0
    orig = load_file(str(tmp_path / "hf" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    if kw.get("tie_word_embeddings"):
        orig.pop("lm_head.weight", None)
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)


def test_sharded_checkpoint_loads_in_place_and_generates(tmp_path, bpe, capsys):
    ref = hf_model("llama", rope_scaling=LLAMA3)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    save_hf_tokenizer(bpe, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    model, tok = load_model(tmp_path / "hf")  # every verb: a Hugging Face directory converts in memory
    idx = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert (model(idx) - ref(idx).logits).abs().max().item() <= TOL
    assert tok.chat_template == TEMPLATE
    assert run_cli("generate", tmp_path / "hf", "prompt=the", "max_new_tokens=5", "temperature=0") == 0
    assert capsys.readouterr().out.startswith("the")


@pytest.mark.parametrize("config, words", [
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type 'gemma'"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]},
     "LlamaForSequenceClassification"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_seq_len": 128},
     "sliding_window=64 in use"),
])
def test_unsupported_checkpoints_are_refused_by_name(tmp_path, config, words):
    from pretune.interop.hf import import_hf

    max_seq_len = config.pop("max_seq_len", None)
    hf = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=300, max_position_embeddings=256, **config)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace("[", r"\[")):
        import_hf(tmp_path / "hf", tmp_path / "out", max_seq_len=max_seq_len, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_embeddings_is_refused_by_every_verb(tmp_path, bpe, capsys):
    from pretune.interop.hf import load_hf_model

    hf_model("llama", vocab_size=200).save_pretrained(tmp_path / "hf")  # bpe has 300 tokens
    save_hf_tokenizer(bpe, tmp_path / "hf")
    with pytest.raises(UserError, match="300 tokens but the model only 200 embeddings"):
        load_hf_model(tmp_path / "hf")
    (tmp_path / "c.txt").write_text("some text " * 200)
    assert run_cli("pretrain", f"init_from={tmp_path / 'hf'}", f"data.train={tmp_path / 'c.txt'}",
                   f"out_dir={tmp_path / 'run'}", "train.max_steps=1") == 2
    assert "200 embeddings" in capsys.readouterr().err


def test_cli_errors_are_user_errors(tmp_path, capsys):
    assert run_cli("import", tmp_path / "absent", tmp_path / "out") == 2
    assert "does not exist: there is no such local directory" in capsys.readouterr().err
    assert run_cli("export", tmp_path / "absent", tmp_path / "out", "--format", "onnx") == 2
    assert "format='onnx'" in capsys.readouterr().err
    assert run_cli("export", tmp_path / "absent") == 2
    assert run_cli("export", tmp_path / "absent", tmp_path / "out", "--adapter") == 2
    assert "is it a LoRA fine-tuning run?" in capsys.readouterr().err
    assert run_cli("export", "--help") == 0
    assert "adapter" in capsys.readouterr().out


def test_hub_id_is_downloaded_with_snapshot_download(tmp_path, bpe, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="the hf extra is not installed")
    ref = hf_model("qwen2")
    ref.save_pretrained(tmp_path / "snapshot")
    save_hf_tokenizer(bpe, tmp_path / "snapshot")
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None, **kw):  # the hub is unreachable here
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert run_cli("import", "Qwen/Qwen2.5-0.5B", tmp_path / "pt", "revision=main", "dtype=bfloat16") == 0
    assert calls[0][:2] == ("Qwen/Qwen2.5-0.5B", "main") and "*.safetensors" in calls[0][2]
    stored = load_file(str(tmp_path / "pt" / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "pt" / "config.json").read_text())["hf_source"] == "Qwen/Qwen2.5-0.5B"


def test_init_from_a_hf_directory_reads_its_tokenizer_as_import_does(tmp_path, bpe):
    """pretrain/finetune init_from=HF_DIR keep the chat template (saved as chat_template.jinja by
    transformers) in the run's tokenizer files, and take EOS from generation_config.json when
    tokenizer_config.json names none, exactly as `pretune import` does."""
    from pretune.interop.hf import load_hf_tokenizer
    from pretune.stages import parent_tokenizer

    hf = tmp_path / "hf"
    hf_model("llama").save_pretrained(hf)
    save_hf_tokenizer(bpe, hf)
    rows = [{"prompt": f"what is {w}?", "response": f"{w} is here."} for w in ["fox", "dog", "tree"] * 4]
    (tmp_path / "inst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ft"
    assert run_cli("finetune", f"init_from={hf}", "task=instruction", f"data.train={tmp_path / 'inst.jsonl'}",
                   "train.max_steps=1", "train.batch_size=2", "train.eval_every=0", "train.threads=1",
                   "train.progress=false", "finetune.eval_examples=2", "finetune.max_new_tokens=2",
                   f"out_dir={out}") == 0
    for d in (out, out / "model"):
        assert json.loads((d / "tokenizer_config.json").read_text()).get("chat_template") == TEMPLATE, d
    assert load_model(out)[1].chat_template == TEMPLATE

    # EOS from generation_config.json (here deliberately a token that is not named like an EOS)
    meta = json.loads((hf / "tokenizer_config.json").read_text())
    meta.pop("eos_token")
    (hf / "tokenizer_config.json").write_text(json.dumps(meta))
    unk = bpe.tok.token_to_id("<|unk|>")
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [unk]}))
    tok = parent_tokenizer(hf)
    assert tok.eos_id == unk == load_hf_tokenizer(hf).eos_id and tok.chat_template == TEMPLATE


# ----------------------------------------------------------------------------- export


EXPORTS = {
    "char-untied-llama": ("char", dict(tie_embeddings=False)),
    "bpe-tied-qwen2-llama3": ("bpe", dict(tie_embeddings=True, qkv_bias=True, rope_scaling=LLAMA3)),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_same_logits_and_greedy_text(tmp_path, request, name):
    from pretune.eval.generate import generate

    tok_kind, kw = EXPORTS[name]
    tok = request.getfixturevalue(tok_kind)
    model = pretune_model(tok, **kw)
    run = save_run(model, tok, tmp_path / "run")
    assert run_cli("export", run, tmp_path / "hf", "format=hf") == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM" if kw.get("qkv_bias") else "LlamaForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    idx = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max().item() <= TOL
    prompt = "the quick brown"
    ids = tok.encode(prompt)
    assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == ids
    specials = (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert specials == (tok.bos_id, tok.eos_id, tok.pad_id)
    ours = generate(model, ids, 20, temperature=0, stop_ids={tok.eos_id})
    x = torch.tensor([ids])
    theirs = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20)
    theirs = [t for t in theirs[0, len(ids):].tolist() if t != tok.eos_id]
    assert ours == theirs and len(ours) > 0
    assert hf_tok.decode(theirs, skip_special_tokens=True) == tok.decode(ours)
    if tok.chat_template:
        msgs = [{"role": "user", "content": "hi"}]
        assert hf_tok.apply_chat_template(msgs, tokenize=False) == "user: hi\n"


def test_generation_config_lists_every_stop_token_and_keeps_the_originals_settings(tmp_path, char):
    """EOS and the chat template's end-of-turn token (ChatML's <|im_end|>) both end generation in
    pretune; the export's generation_config.json (and config.json) list both, and an imported model's
    own generation_config.json (sampling defaults, more stop ids) is carried through."""
    from pretune.interop.hf import export_hf, import_hf

    tok = Tokenizer(copy.deepcopy(char.tok), chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"))
    tok.tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    stops = sorted([tok.eos_id, tok.tok.token_to_id("<|im_end|>")])
    run = save_run(pretune_model(tok), tok, tmp_path / "run")
    export_hf(run, tmp_path / "hf", log=lambda s: None)
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert gen.eos_token_id == stops and (gen.bos_token_id, gen.pad_token_id) == (tok.bos_id, tok.pad_id)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == stops
    export_hf(save_run(pretune_model(char), char, tmp_path / "plain"), tmp_path / "hf-plain", log=print)
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf-plain").eos_token_id == char.eos_id

    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.eos_id, 5], "temperature": 0.6, "top_p": 0.9, "do_sample": True}))
    import_hf(tmp_path / "hf", tmp_path / "pt", log=lambda s: None)
    export_hf(tmp_path / "pt", tmp_path / "hf2", log=lambda s: None)
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf2")
    assert gen.eos_token_id == sorted(set(stops) | {5}) and gen.bos_token_id == tok.bos_id
    assert (gen.temperature, gen.top_p, gen.do_sample) == (0.6, 0.9, True)
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["eos_token_id"] == gen.eos_token_id


def test_exported_directory_is_refused_as_output_twice(tmp_path, char, capsys):
    run = save_run(pretune_model(char), char, tmp_path / "run")
    assert run_cli("export", run, tmp_path / "hf") == 0
    assert run_cli("export", run, tmp_path / "hf") == 2
    assert "already exists" in capsys.readouterr().err
    assert run_cli("export", run, tmp_path / "hf", "overwrite=true", "dtype=bfloat16") == 0
    assert load_file(str(tmp_path / "hf" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16


def test_export_without_a_template_carries_the_default_the_model_is_chatted_with(tmp_path, char):
    """A tokenizer with no chat template is fine-tuned, served and chatted with on pretune's default
    template; the HF and GGUF exports carry it, so transformers prompts the model the same way."""
    gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
    from pretune.data.templates import DEFAULT_CHAT_TEMPLATE, render_chat

    assert char.chat_template is None
    run = save_run(pretune_model(char), char, tmp_path / "run")
    assert run_cli("export", run, tmp_path / "hf") == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    for gen in (True, False):
        theirs = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert theirs == render_chat(msgs, char, add_generation_prompt=gen)
    assert hf_tok(theirs, add_special_tokens=False)["input_ids"] == char.encode(theirs)
    assert load_model(tmp_path / "hf")[1].chat_template == DEFAULT_CHAT_TEMPLATE  # and back again
    assert run_cli("export", run, tmp_path / "gg", "--format", "gguf") == 0
    reader = gguf.GGUFReader(tmp_path / "gg" / "model.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == DEFAULT_CHAT_TEMPLATE


def add_classifier_head(directory: Path, labels=("neg", "pos")) -> None:
    """task.json and head.safetensors as a classification fine-tune writes them beside its model."""
    (directory / "task.json").write_text(json.dumps(
        {"task": "classification", "labels": list(labels), "classifier": "head"}))
    save_file({"weight": torch.randn(len(labels), 64), "bias": torch.randn(len(labels))},
              str(directory / "head.safetensors"))


def test_a_classification_run_is_not_exported_without_its_head_unless_asked(tmp_path, char, capsys):
    run = save_run(pretune_model(char), char, tmp_path / "run")
    add_classifier_head(run / "model")
    for extra in ([], ["--format", "gguf"]):
        assert run_cli("export", run, tmp_path / "out", *extra) == 2
        err = capsys.readouterr().err
        assert "classification model" in err and "lm_only=true" in err and "neg, pos" in err
        assert not (tmp_path / "out").exists()
    assert run_cli("export", run, tmp_path / "out", "--lm-only") == 0
    assert "without its classification head" in capsys.readouterr().out
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    assert run_cli("export", run, tmp_path / "out.gguf", "--format", "gguf", "lm_only=true") == 0
    assert run_cli("import", tmp_path / "out", tmp_path / "back", "--lm-only") == 2  # an export key only

    # A LoRA classification run keeps its head in adapter/: the PEFT adapter alone would lose it.
    save_run(pretune_model(char, tie_embeddings=False), char, tmp_path / "base")
    make_lora_run(tmp_path / "base", tmp_path / "lora", char, ("q_proj",))
    add_classifier_head(tmp_path / "lora" / "adapter")
    assert run_cli("export", tmp_path / "lora", tmp_path / "adapter", "--adapter") == 2
    assert "classification model" in capsys.readouterr().err and not (tmp_path / "adapter").exists()
    assert run_cli("export", tmp_path / "lora", tmp_path / "adapter", "--adapter", "--lm-only") == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def make_lora_run(base_run: Path, run: Path, tok: Tokenizer, targets, rank=4, alpha=8.0) -> GPT:
    """A LoRA fine-tuning run as the finetune stage writes it: merged model/ and adapter/."""
    from pretune.model.lora import apply_lora, lora_state_dict, merge_lora

    lora, _ = load_model(base_run)
    apply_lora(lora, rank=rank, alpha=alpha, targets=targets)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lora.eval()
    save_run(merge_lora(copy.deepcopy(lora)), tok, run)
    (run / "adapter").mkdir()
    save_file(lora_state_dict(lora), str(run / "adapter" / "adapter.safetensors"))
    (run / "adapter" / "lora.json").write_text(json.dumps(
        {"rank": rank, "alpha": alpha, "dropout": 0.0, "targets": list(targets), "base": str(base_run)}))
    return lora


@pytest.mark.parametrize("targets", [("q_proj", "v_proj", "down_proj"), ("blocks.1.*",)])
def test_lora_run_exports_a_peft_adapter_with_same_logits(tmp_path, char, targets):
    peft = pytest.importorskip("peft", reason="the hf extra (peft) is not installed")
    save_run(pretune_model(char, tie_embeddings=False), char, tmp_path / "base")
    lora = make_lora_run(tmp_path / "base", tmp_path / "run", char, targets)
    assert run_cli("export", tmp_path / "base", tmp_path / "hf-base") == 0
    assert run_cli("export", tmp_path / "run", tmp_path / "adapter", "--adapter") == 0
    assert run_cli("export", tmp_path / "run", tmp_path / "hf-merged") == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    leaf = targets[0] != "blocks.1.*"
    assert (config["target_modules"] == sorted(targets)) == leaf
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base", dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-merged", dtype=torch.float32)
    idx = torch.randint(0, char.vocab_size, (2, 30))
    with torch.no_grad():
        ours = lora(idx)
        assert (adapted(idx).logits - ours).abs().max().item() <= TOL
        assert (merged(idx).logits - ours).abs().max().item() <= TOL
        with adapted.disable_adapter():  # the adapter really does something
            assert (adapted(idx).logits - ours).abs().max().item() > 1e-2


# ----------------------------------------------------------------------------- lm-evaluation-harness


TASK = """task: tiny_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_scores_an_exported_model_on_a_local_task(tmp_path, char, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = pretune_model(char, tie_embeddings=False)
    run = save_run(model, char, tmp_path / "run")
    assert run_cli("export", run, tmp_path / "hf") == 0
    rows = [{"question": "the quick brown", "choices": ["fox", "dog", "cat"], "answer": 0},
            {"question": "a bird sings in the", "choices": ["old tree", "river"], "answer": 1},
            {"question": "hello", "choices": ["there", "world"], "answer": 0}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_local.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl",
                                                                     cache=tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", batch_size=1, device="cpu")
        tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False).load(["tiny_local"])
        out = evaluate(lm, tasks, log_samples=True, bootstrap_iters=0)
    finally:
        torch.set_num_threads(threads)

    def logprob(context: str, continuation: str) -> float:
        """log p(continuation | context) under the pretune model itself."""
        ctx, cont = char.encode(context), char.encode(continuation)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0, :-1].double(), -1)
        return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))

    correct = 0
    for sample in out["samples"]["tiny_local"]:
        doc = sample["doc"]
        ours = [logprob(doc["question"], " " + c) for c in doc["choices"]]
        theirs = [r[0][0] for r in sample["resps"]]
        assert ours == pytest.approx(theirs, abs=1e-3)
        correct += max(range(len(ours)), key=ours.__getitem__) == doc["answer"]
    assert out["results"]["tiny_local"]["acc,none"] == pytest.approx(correct / len(rows))


# ----------------------------------------------------------------------------- later additions


def test_peft_adapter_names_a_base_that_auto_peft_model_loads(tmp_path, bpe, char, capsys, monkeypatch):
    peft = pytest.importorskip("peft", reason="the hf extra (peft) is not installed")
    from pretune.interop.peft import loadable_base

    idx = torch.randint(0, 200, (2, 30))
    # a base imported from a Hugging Face directory: the adapter names that directory
    hf_model("llama").save_pretrained(tmp_path / "hf")
    save_hf_tokenizer(bpe, tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    assert run_cli("import", "hf", "imported") == 0  # typed relative: recorded absolute
    lora = make_lora_run(tmp_path / "imported", tmp_path / "lora", bpe, ("q_proj", "v_proj"))
    assert run_cli("export", tmp_path / "lora", tmp_path / "adapter", "--adapter") == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "hf").resolve())
    monkeypatch.chdir(tmp_path / "adapter")  # found from anywhere
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (auto(idx).logits - lora(idx)).abs().max().item() <= TOL
    # a base imported from a hub id: the hub id and its revision
    (tmp_path / "hub").mkdir()
    raw = json.loads((tmp_path / "imported" / "config.json").read_text())
    (tmp_path / "hub" / "config.json").write_text(json.dumps({**raw, "hf_source": "org/name", "hf_revision": "v1"}))
    (tmp_path / "hub" / "model.safetensors").write_bytes(b"")
    assert loadable_base(str(tmp_path / "hub")) == ("org/name", "v1", True)
    # a base trained by pretune: its run path, said to need exporting; base= names its export instead
    capsys.readouterr()
    save_run(pretune_model(char, tie_embeddings=False), char, tmp_path / "base")
    lora = make_lora_run(tmp_path / "base", tmp_path / "lora2", char, ("q_proj",))
    assert run_cli("export", tmp_path / "lora2", tmp_path / "a2", "--adapter") == 0
    out = capsys.readouterr().out
    assert "transformers cannot load" in out and "PeftModel.from_pretrained(AutoModelForCausalLM" in out
    config = json.loads((tmp_path / "a2" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert run_cli("export", tmp_path / "base", tmp_path / "hf-base") == 0
    assert run_cli("export", tmp_path / "lora2", tmp_path / "a3", "--adapter", f"base={tmp_path / 'hf-base'}") == 0
    config = json.loads((tmp_path / "a3" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "hf-base").resolve())
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a3", dtype=torch.float32).eval()
    idx = torch.randint(0, char.vocab_size, (2, 30))
    with torch.no_grad():
        assert (auto(idx).logits - lora(idx)).abs().max().item() <= TOL
    assert run_cli("export", tmp_path / "base", tmp_path / "a4", f"base={tmp_path / 'hf-base'}") == 2
