import os
import shutil

import pytest
import torch

from pretune.eval.generate import filter_logits, generate
from pretune.model.config import ModelConfig, count_params, flops_per_token, resolve_model_config
from pretune.model.gpt import GPT, KVCache
from pretune.train.meter import flops_per_token as live_flops


def tiny(**kw):
    return GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=50, **kw)))


def test_kv_cache_logits_equal_full_forward():
    torch.manual_seed(0)
    model = tiny().eval()
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx)
    cache = KVCache.empty(model.cfg, 2, 20, "cpu", torch.float32)
    parts = [model(idx[:, :7], cache=cache), model(idx[:, 7:12], cache=cache)]
    parts += [model(idx[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_param_count_from_config_matches_allocation():
    for kw in ({}, {"tie_embeddings": False, "qkv_bias": True, "n_kv_head": 1}):
        model = tiny(**kw)
        assert count_params(model.cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_tied_embeddings_share_storage():
    model = tiny()
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_flops_analytic_equals_live_count_when_all_trainable():
    model = tiny()
    analytic = flops_per_token(model.cfg, 32)["per_token"]
    assert live_flops(model, 32)["total"] == analytic
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # tied with the embedding
    live = live_flops(model, 32)
    assert live["frozen"] > 0 and live["total"] < analytic


def test_causality():
    model = tiny().eval()
    a = torch.randint(0, 50, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 50
    assert torch.allclose(model(a)[0, :10], model(b)[0, :10], atol=1e-6)


def test_sampling_filters_and_seed():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert (filter_logits(logits, 1.0, 2, None)[0, 2:] == 0).all()
    p = filter_logits(logits, 1.0, None, 0.5)
    assert p[0, 0] == 1.0
    model = tiny()
    assert generate(model, [1, 2, 3], 10, seed=5) == generate(model, [1, 2, 3], 10, seed=5)
    assert generate(model, [1, 2, 3], 10, temperature=0) == generate(model, [1, 2, 3], 10, temperature=0)


def test_generation_past_the_context_slides_the_window_by_half_a_context():
    torch.manual_seed(0)
    model = tiny(max_seq_len=16).eval()
    L = model.cfg.max_seq_len
    for prompt in ([1, 2, 3, 4, 5], list(range(1, 40))):  # shorter and longer than the context
        held, want = prompt[-(L - 1):], []
        for _ in range(40):  # the reference: the whole window through the model, no cache
            want.append(int(model(torch.tensor([held]))[0, -1].argmax()))
            held = held + want[-1:]
            if len(held) > L:
                held = held[-(L // 2):]
        assert generate(model, prompt, 40, temperature=0) == want


def test_llama3_rope_scaling_changes_only_low_frequencies():
    from pretune.model.gpt import rope_tables

    base = resolve_model_config(ModelConfig(preset="tiny", vocab_size=10, head_dim=64, max_seq_len=64))
    scaled = resolve_model_config(ModelConfig(preset="tiny", vocab_size=10, head_dim=64, max_seq_len=64,
                                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 64}))
    _, c0 = rope_tables(base)
    _, c1 = rope_tables(scaled)
    assert torch.allclose(c0[:, 0], c1[:, 0]) and not torch.allclose(c0[:, 31], c1[:, 31])


def test_lora_cpu_product_matches_plain_autograd_in_output_and_gradients_with_and_without_dropout():
    from pretune.model.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(24, 40), rank=4, alpha=8.0)
    torch.nn.init.normal_(layer.lora_b)  # B = 0 at start would hide errors in its path
    a = layer.lora_a.detach().clone().requires_grad_(True)
    b = layer.lora_b.detach().clone().requires_grad_(True)
    x1 = torch.randn(3, 7, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1 = layer(x1)  # the hand-written CPU function
    y2 = torch.nn.functional.linear(x2, layer.weight, layer.bias) + layer.scale * (x2 @ a.t()) @ b.t()
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_a.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_b.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None  # the frozen base gets no gradient buffer

    # with adapter dropout in training: the same dropped-out input (same seed) in both
    layer.dropout = torch.nn.Dropout(0.3)
    for t in (x1, x2, layer.lora_a, layer.lora_b, a, b):
        t.grad = None
    torch.manual_seed(1)
    y1 = layer(x1)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x2.reshape(-1, 24), 0.3).view_as(x2)
    y2 = torch.nn.functional.linear(x2, layer.weight, layer.bias) + layer.scale * (dropped @ a.t()) @ b.t()
    assert not torch.allclose(dropped, x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_a.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_b.grad, b.grad, rtol=1e-5, atol=1e-5)



def test_adapted_projections_sharing_an_input_run_as_one_product_with_the_same_results():
    """On the CPU, adapted q/k/v (and gate/up) run as one product, each output block with its own
    adapter: the logits and every adapter's gradient equal those of one product per layer, with
    grouped keys/values and biases; with adapter dropout in training they stay separate."""
    from pretune.model import gpt
    from pretune.model.lora import LoRALinear, apply_lora

    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(preset="custom", n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                           d_ff=64, max_seq_len=32, qkv_bias=True), 50)
    model = GPT(cfg)
    apply_lora(model, rank=4, alpha=8.0)  # every projection
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.1)  # B = 0 would hide a block in the wrong place
            if m.bias is not None:
                torch.nn.init.normal_(m.bias, std=0.1)
    idx = torch.randint(0, 50, (8, 32))  # 256 rows: enough for the fused path
    x = model.blocks[0].attn_norm(model.tok_emb(idx))
    attn = model.blocks[0].attn
    assert gpt._fuse(x, attn.q_proj, attn.k_proj, attn.v_proj)
    assert not gpt._fuse(x[:1, :4], attn.q_proj, attn.k_proj, attn.v_proj)  # too few rows

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(idx)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused, fused_grads = run()
    can_fuse = LoRALinear.can_fuse
    LoRALinear.can_fuse = staticmethod(lambda x, layers: False)
    try:
        separate, separate_grads = run()
    finally:
        LoRALinear.can_fuse = can_fuse
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == separate_grads.keys() and len(fused_grads) == 2 * 7 * 2
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, separate_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.dropout = torch.nn.Dropout(0.1)
    assert not gpt._fuse(x, attn.q_proj, attn.k_proj, attn.v_proj)
    model.eval()  # no dropout at evaluation: one product again
    assert gpt._fuse(x, attn.q_proj, attn.k_proj, attn.v_proj)

@pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler (g++ or clang++), and none is installed")
def test_compiled_forward_matches_eager_without_complex_kernels():
    """train.compile=true on the CPU: the compiled model gives the eager model's logits, and it
    rotates q/k with real arithmetic that inductor fuses, not eager's complex product (which
    inductor would leave to eager kernels, with a warning)."""
    import warnings

    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(preset="custom", n_layer=2, n_head=2, n_kv_head=1, d_model=32,
                                           d_ff=64, max_seq_len=32), 50)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 50, (8, 32))  # 8 x 32 rows: the fused q/k/v path
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager, compiled = model(idx), torch.compile(model)(idx)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert not [w for w in caught if "complex" in str(w.message)], [str(w.message) for w in caught]


def test_logits_at_selected_positions_give_the_full_losses_and_gradients():
    """Task batches compute the output projection only where a target is (`select`): the same
    summed loss, row log-probabilities and gradients as the full logits."""
    from pretune.data.tasks import lm_batch
    from pretune.model.gpt import cross_entropy_sum
    from pretune.train.objectives import lm_loss_sum, sequence_logprobs

    torch.manual_seed(0)
    model = tiny()
    seqs = [torch.randint(1, 50, (n,)).tolist() for n in (9, 14, 5)]
    masks = [[0] * 6 + [1] * 3, [0] * 4 + [1] * 10, [0] * 2 + [1] * 3]  # prompts carry no loss
    batch = lm_batch(seqs, masks, pad_id=0)
    assert batch["select"].tolist() == [5, 6, 7, 13 + 3, *range(13 + 4, 13 + 13), 2 * 13 + 1, 2 * 13 + 2, 2 * 13 + 3]

    def with_grads(fn):
        model.zero_grad(set_to_none=True)
        out = fn()
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    full = {k: v for k, v in batch.items() if k != "select"}
    loss_sel, grads_sel = with_grads(lambda: lm_loss_sum(model, batch))
    loss_full, grads_full = with_grads(lambda: cross_entropy_sum(model(batch["input_ids"]), batch["targets"]))
    torch.testing.assert_close(loss_sel, loss_full)
    for a, b in zip(grads_sel, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    rows_sel, _ = with_grads(lambda: sequence_logprobs(model, batch))
    def rows_from_full_logits():
        logp = torch.log_softmax(model(batch["input_ids"]), -1)
        t = batch["targets"]
        return (logp.gather(-1, t.clamp_min(0)[..., None])[..., 0] * (t != -100)).sum(-1)

    rows_full, _ = with_grads(rows_from_full_logits)
    torch.testing.assert_close(sequence_logprobs(model, full), rows_full)  # without select: derived from targets
    torch.testing.assert_close(rows_sel, rows_full)
    assert model(batch["input_ids"], select=batch["select"]).shape == (len(batch["select"]), 50)


def test_sentence_logprobs_batched_by_length_equal_each_sentence_scored_alone():
    from pretune.data.tokenizer import train_char
    from pretune.eval.bias import bias_score, sentence_logprobs

    sentences = ["a cat.", "the old dog sat on a mat by the door.", "ab", "the cat ran.",
                 "a bird sang in the tree all day long", "dog"]
    tok = train_char(sentences)
    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=tok.vocab_size)))
    alone = [sentence_logprobs(model, tok, [s], "cpu")[0] for s in sentences]
    batched = sentence_logprobs(model, tok, sentences, "cpu", batch_size=4)
    assert batched == pytest.approx(alone, rel=1e-5, abs=1e-4)
    pairs = [{"more": sentences[i], "less": sentences[i + 1], "type": "t"} for i in (0, 2, 4)]
    b = bias_score(model, tok, pairs, "cpu")
    assert b["prefers_more"] == [int(alone[i] > alone[i + 1]) for i in (0, 2, 4)]
