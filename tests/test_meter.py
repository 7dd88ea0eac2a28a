"""The cost meter against torch's own FLOP counter on real forward and backward passes: pre-training,
fine-tuning that projects onto the vocabulary at its target positions only, a classifier's head, DPO
with its reference, and prompting (forward only)."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretune.data.tasks import lm_batch
from pretune.model.config import ModelConfig, resolve_model_config
from pretune.model.gpt import GPT
from pretune.model.heads import ClassifierModel
from pretune.model.lora import apply_lora
from pretune.train.meter import batch_flops, flops_per_token
from pretune.train.objectives import ClassifierObjective, DPOObjective, LMObjective

B, T, V = 4, 32, 512


def model(tie=False):
    torch.manual_seed(0)
    return GPT(resolve_model_config(ModelConfig(preset="custom", vocab_size=V, n_layer=2, n_head=4, n_kv_head=2,
                                                d_model=64, d_ff=192, max_seq_len=64, tie_embeddings=tie)))


def counted(m, objective, batch, backward=True) -> float:
    with FlopCounterMode(display=False) as fc:
        loss = objective(m, batch)
        if backward:
            loss.backward()
    return fc.get_total_flops()


def windows():
    torch.manual_seed(1)
    return torch.randint(0, V, (B, T + 1))


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("tie", [False, True])
def test_language_model_batches(method, tie):
    m = model(tie)
    if method == "lora":
        apply_lora(m, rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    ids = windows()
    fpt = flops_per_token(m, T)
    plain = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}  # pre-training: the projection at every token
    # fine-tuning: 8 target tokens a row, the vocabulary projection at those alone
    tuned = lm_batch([row.tolist() for row in ids], [[0] * (T + 1 - 8) + [1] * 8] * B, 0)
    narrow = {"input_ids": ids[:, :T // 2], "targets": ids[:, 1:T // 2 + 1]}  # attention at its own width
    for batch in (plain, tuned, narrow):
        got = counted(m, LMObjective(), batch)
        # LoRA within 3%: the meter counts the adapters' own small products as 6 per parameter, and on
        # the CPU q/k/v adapters of 128 rows or more run stacked, with a block-diagonal B whose zeros
        # the counter counts too (gpt.fused_linear)
        assert batch_flops(fpt, batch) == pytest.approx(got, rel=0.03 if method == "lora" else 1e-9)


def test_a_classifier_head_runs_once_per_example_and_the_vocabulary_projection_not_at_all():
    lm = model()
    cm = ClassifierModel(lm, 3)
    ids = windows()
    batch = {"input_ids": ids[:, :-1], "last": torch.full((B,), T - 1), "labels": torch.tensor([0, 1, 2, 0]),
             "n_tokens": B * T}
    assert batch_flops(flops_per_token(cm, T), batch) == pytest.approx(counted(cm, ClassifierObjective(), batch),
                                                                       rel=1e-9)


def test_dpo_counts_its_reference_and_prompting_a_forward_pass():
    m = model()
    ids = windows()
    pairs = dict(lm_batch([row.tolist() for row in ids], [[0] * (T + 1 - 8) + [1] * 8] * B, 0), pairs=B // 2)
    dpo = DPOObjective(m, beta=0.1)  # full fine-tuning: the reference is a frozen copy
    fpt = flops_per_token(m, T)
    assert batch_flops(fpt, pairs, reference=True) == pytest.approx(counted(m, dpo, pairs), rel=1e-9)
    frozen = copy.deepcopy(m).requires_grad_(False)  # prompting: nothing trainable, forward only
    plain = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    with torch.no_grad():
        got = counted(frozen, LMObjective(), plain, backward=False)
    assert flops_per_token(frozen, T)["total"] * B * T == pytest.approx(got, rel=1e-9)


class _Windows:
    """Random token windows, the same for a given step (what PretrainData gives the loop)."""

    def __init__(self, batch: int):
        self.seq_len, self.batch = 128, batch

    def micro_batches(self, step, rank, world):
        r = torch.randint(0, 2048, (self.batch, self.seq_len + 1), generator=torch.Generator().manual_seed(step))
        return [{"input_ids": r[:, :-1], "targets": r[:, 1:]}]


def test_a_run_after_a_larger_one_in_the_same_process_reports_its_own_peak_memory(tmp_path):
    import gc
    import sys

    from pretune.config import Config, load_config
    from pretune.train.dist import setup
    from pretune.train.loop import train

    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU peak is the resident high-water mark that Linux lets a process reset")

    def peak(d: int, batch: int, out) -> float:
        out.mkdir()
        cfg = load_config(Config, None, [f"out_dir={out}", "train.max_steps=2", f"train.batch_size={batch}",
                                         "train.eval_every=0", "train.save_every=0", "train.progress=false"])
        torch.manual_seed(0)
        m = GPT(resolve_model_config(ModelConfig(preset="custom", vocab_size=2048, n_layer=2, n_head=4, n_kv_head=4,
                                                 d_model=d, d_ff=3 * d, max_seq_len=128)))
        s = train(m, cfg, setup("cpu", "fp32", 1), out, _Windows(batch), LMObjective(), log=lambda *a: None,
                  save_final=lambda m, d: None)
        gc.collect()
        # throughput over the training time, which leaves out set-up and the end of the run
        assert 0 < s["train_s"] < s["wall_s"] and s["tokens_per_s"] == pytest.approx(s["tokens"] / s["train_s"])
        return s["peak_mem_bytes"] / 2 ** 20

    alone = peak(64, 4, tmp_path / "a")
    big = peak(384, 16, tmp_path / "b")
    after = peak(64, 4, tmp_path / "c")
    assert big > alone + 200 and after < alone + 100, (alone, big, after)  # MiB


def test_rapl_energy_sums_every_package_and_counts_through_a_wrap(tmp_path):
    from pretune.train.meter import EnergyCounter

    def zone(name: str, uj: int, wrap: int | None = 1_000_000):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "energy_uj").write_text(str(uj))
        if wrap is not None:
            (tmp_path / name / "max_energy_range_uj").write_text(str(wrap))

    zone("intel-rapl:0", 900_000)
    zone("intel-rapl:1", 100_000)
    zone("intel-rapl:0:0", 5)  # a sub-zone (the cores of package 0): part of package 0, not added
    counter = EnergyCounter(torch.device("cpu"), rapl_root=tmp_path)
    assert counter.source == "rapl"
    zone("intel-rapl:0", 50_000)  # wrapped: 100,000 to the range, then 50,000
    zone("intel-rapl:1", 400_000)
    zone("intel-rapl:0:0", 999_999)
    assert counter.joules() == pytest.approx(0.15 + 0.3)
    zone("intel-rapl:0", 250_000)
    assert counter.joules() == pytest.approx(0.45 + 0.2)
    zone("intel-rapl:1", 0, wrap=None)
    (tmp_path / "intel-rapl:1" / "max_energy_range_uj").unlink()
    fresh = EnergyCounter(torch.device("cpu"), power_w=1e6, rapl_root=tmp_path)
    zone("intel-rapl:1", 10, wrap=None)
    assert fresh.joules() == pytest.approx(10 / 1e6)
    zone("intel-rapl:1", 5, wrap=None)  # went back with no known range: the power x time estimate
    assert fresh.joules() > 1.0
    assert EnergyCounter(torch.device("cpu"), rapl_root=tmp_path / "none").source == "estimate"
