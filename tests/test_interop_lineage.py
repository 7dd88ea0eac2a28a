"""What an export of a model trained from an imported one keeps of the original: its
generation_config.json (sampling defaults, every stop id) and the context it was made for, found
through the runs' lineage; `import max_seq_len=` sizes the RoPE tables only."""

from __future__ import annotations

import json

import pytest
from conftest import make_corpus, run_cli
from interop_models import char, pretune_model, save_run  # noqa: F401 (fixtures)

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def test_a_model_trained_from_an_import_exports_the_originals_generation_config_and_context(tmp_path, char):
    from pretune.interop.gguf import export_gguf
    from pretune.interop.hf import export_hf, import_hf

    quiet = dict(log=lambda s: None)
    export_hf(save_run(pretune_model(char), char, tmp_path / "run"), tmp_path / "hf", **quiet)
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_cfg, "max_position_embeddings": 4096}))
    original = {"eos_token_id": [char.eos_id, 5, 7], "temperature": 0.6, "top_p": 0.9, "do_sample": True}
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(original))
    import_hf(tmp_path / "hf", tmp_path / "pt", max_seq_len=64, **quiet)  # RoPE tables for 64 positions
    corpus = make_corpus(tmp_path / "c.txt", lines=200)
    common = ["train.max_steps=1", "train.batch_size=2", "train.seq_len=32", "train.eval_every=0",
              "train.save_every=0", "train.threads=1", "train.progress=false"]
    assert run_cli("pretrain", "init_from=" + str(tmp_path / "pt"), f"data.train={corpus}",
                   f"out_dir={tmp_path / 'cpt'}", *common) == 0
    rows = [{"prompt": f"say {w}", "response": f"{w}."} for w in ["fox", "dog", "tree", "bird"] * 2]
    (tmp_path / "inst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli("finetune", "init_from=" + str(tmp_path / "cpt"), "task=instruction", "method=lora",
                   "lora.save=merged", f"data.train={tmp_path / 'inst.jsonl'}", "finetune.eval_examples=0",
                   f"out_dir={tmp_path / 'ft'}", *common) == 0
    for name in ("cpt", "ft"):  # continued pre-training of the import, and a fine-tune of that
        out = tmp_path / f"{name}-hf"
        export_hf(tmp_path / name, out, **quiet)
        gen = transformers.GenerationConfig.from_pretrained(out)
        assert (gen.temperature, gen.top_p, gen.do_sample) == (0.6, 0.9, True), name
        assert set(original["eos_token_id"]) <= set(gen.eos_token_id), name
        assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 4096, name
    gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
    export_gguf(tmp_path / "ft", tmp_path / "ft.gguf", **quiet)
    field = gguf.GGUFReader(str(tmp_path / "ft.gguf")).fields["llama.context_length"]
    assert int(field.parts[field.data[0]][0]) == 4096
    # a model of pretune's own declares the context it was trained for
    export_hf(tmp_path / "run", tmp_path / "own-hf", **quiet)
    assert json.loads((tmp_path / "own-hf" / "config.json").read_text())["max_position_embeddings"] == \
        pretune_model(char).cfg.max_seq_len


def test_a_bos_declared_null_stays_absent_through_import_training_and_export(tmp_path, char):
    """Qwen2's tokenizer_config.json says `"bos_token": null`: no token that merely looks like a BOS
    (here <|bos|>, in the vocabulary) is taken for one, so chat templates that write `bos_token`
    render as transformers renders them, and the export declares no BOS either."""
    from pretune.data.templates import render_chat
    from pretune.interop.hf import export_hf, import_hf
    from pretune.model.io import load_model

    quiet = dict(log=lambda s: None)
    export_hf(save_run(pretune_model(char), char, tmp_path / "run"), tmp_path / "hf", **quiet)
    meta_file = tmp_path / "hf" / "tokenizer_config.json"
    meta = json.loads(meta_file.read_text())
    meta.update(bos_token=None, chat_template="{{ bos_token if bos_token else '' }}{% for m in messages %}"
                "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    meta_file.write_text(json.dumps(meta))
    (tmp_path / "hf" / "chat_template.jinja").unlink(missing_ok=True)
    msgs = [{"role": "user", "content": "hi"}]
    want = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(msgs, tokenize=False)
    assert want == "<user>hi"
    import_hf(tmp_path / "hf", tmp_path / "pt", **quiet)
    tok = load_model(tmp_path / "pt")[1]
    assert tok.bos_id is None and render_chat(msgs, tok) == want
    export_hf(tmp_path / "pt", tmp_path / "back", **quiet)
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["bos_token"] is None
    assert json.loads((tmp_path / "back" / "config.json").read_text())["bos_token_id"] is None
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back").bos_token is None
