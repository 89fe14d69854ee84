"""The memory plan (memory.py, bench.py --plan) against memory measured on the CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import memory as Mem
import model as M
from conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# bf16 as on a GPU. PyTorch's CPU attention in bf16 needs AVX-512 kernels ("pack_vnni2 is only supported when avx512
# is supported" under ATEN_CPU_CAPABILITY=default), so elsewhere the plan is checked in fp32, the same way.
DTYPE = torch.bfloat16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else torch.float32


def measured_step_peak(d, layers, mlp, vocab, b, P, L, r, ckpt, dtype=DTYPE, fsdp_ranks=0):
    """Peak resident memory above the level before one update micro-batch (tests/measure_peak.py); with
    fsdp_ranks, the largest over that many gloo ranks sharding the model with FSDP2."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={fsdp_ranks}",
                                  f"--master_port={free_port()}"] if fsdp_ranks else [])
    out = subprocess.run(launch + [os.path.join(ROOT, "tests", "measure_peak.py")] +
                         [str(x) for x in (d, layers, mlp, vocab, b, P, L, r, int(ckpt))] + [str(dtype)[6:]] +
                         (["fsdp"] if fsdp_ranks else []), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return max(json.loads(line)["peak_above_base"] for line in out.stdout.splitlines() if line.startswith("{"))


@pytest.mark.parametrize("d,layers,mlp,vocab,b,P,L,r,ckpt", [
    (512, 4, 1536, 32000, 4, 64, 128, 16, False),  # logits-heavy
    (512, 4, 1536, 32000, 4, 64, 128, 16, True),  # gradient checkpointing
    (512, 8, 1536, 16000, 6, 32, 96, 16, False),  # activation-heavy
])
def test_planned_peak_agrees_with_the_measured_peak_within_25_percent(d, layers, mlp, vocab, b, P, L, r, ckpt):
    """What one update micro-batch adds on top of the weights, adapters and optimizer state: the plan (saved bytes
    measured on one block at the probe width and scaled, plus the logits' transients) against the resident set
    measured during a real forward + backward + step of the same shapes."""
    cfg = M.LLaDAConfig(d_model=d, n_layers=layers, n_heads=d // 64, n_kv_heads=d // 64, mlp_hidden_size=mlp,
                        vocab_size=vocab, embedding_size=vocab)
    p = Mem.plan(Mem.Setting(cfg, micro_batch=b, prompt_len=P, completion_len=L, dtype=DTYPE, lora_r=r,
                             grad_ckpt=ckpt))
    n_lora = Mem.trainable_params(cfg, r, M.LORA_TARGETS)
    # The measurement's starting level already holds weights, adapters and AdamW state; the step allocates the
    # adapters' gradients (fp32) and everything dynamic.
    planned = p["update peak"] - p["weights"] - p["LoRA params, grads, AdamW (fp32)"] + 4 * n_lora
    measured = measured_step_peak(d, layers, mlp, vocab, b, P, L, r, ckpt)
    assert 0.75 < planned / measured < 1.25, (planned / 2**20, measured / 2**20)


@pytest.mark.parametrize("ranks", [1, 2])
def test_full_fine_tuning_plan_agrees_with_the_measured_peak_alone_and_sharded_over_two_ranks(ranks):
    """Full fine-tuning (fp32 weights, gradients and AdamW state), one process or sharded over 2 gloo ranks with
    FSDP2: what one update adds to the level before it (the plan without its static part: the sharded weights and
    AdamW moments) against the measured peak per rank. Sharded, the update also gathers the root (embeddings and
    head, the largest tensors at this width) and blocks whole, and the head's gradient before its reduce-scatter."""
    cfg = M.LLaDAConfig(d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, mlp_hidden_size=1536, vocab_size=32000,
                        embedding_size=32000)
    p = Mem.plan(Mem.Setting(cfg, micro_batch=4, prompt_len=64, completion_len=128, dtype=torch.float32, lora_r=0,
                             world=ranks, fsdp=ranks > 1))
    planned = p["update peak"] - sum(v for k, v in p.items() if k.startswith(("weights", "AdamW moments")))
    measured = measured_step_peak(512, 4, 1536, 32000, 4, 64, 128, 0, False, torch.float32, ranks if ranks > 1 else 0)
    assert 0.75 < planned / measured < 1.25, (planned / 2**20, measured / 2**20)


def test_plan_of_d1s_rl_setting_on_llada_8b_and_what_fits(capsys):
    p = bench.main(["--plan", "--config", "llada-8b"])
    text = capsys.readouterr().out
    assert "micro-batch 6 x (200 prompt + 256 completion tokens)" in text and "Largest update micro-batch" in text
    cfg = M.LLaDAConfig()
    assert p["weights"] == 2 * sum(x.numel() for x in Mem._meta_params(cfg))  # bf16
    assert Mem.trainable_params(cfg, 128, M.LORA_TARGETS) == 32 * 128 * (3 * (4096 + 4096) + 4096 + 12288)
    assert 20 * Mem.GIB < p["total"] < 60 * Mem.GIB
    ckpt = bench.main(["--plan", "--config", "llada-8b", "--grad-ckpt"])
    assert ckpt["update peak"] < p["update peak"]
    full = bench.main(["--plan", "--config", "llada-8b", "--lora-r", "0", "--full-ft-reference"])
    assert full["total"] > 80 * Mem.GIB  # full fine-tuning of 8B with a reference copy cannot fit one GPU
    sharded = bench.main(["--plan", "--config", "llada-8b", "--lora-r", "0", "--full-ft-reference", "--fsdp",
                          "--world-size", "8"])
    assert sharded["total"] < 80 * Mem.GIB  # ... and fits a node of 8 with FSDP2
    assert sharded["weights (1/8 each)"] == full["weights"] / 8
    lora8 = bench.main(["--plan", "--config", "llada-8b", "--fsdp", "--world-size", "8"])
    assert lora8["weights (1/8 each)"] == p["weights"] / 8 and lora8["total"] < p["total"]  # the frozen base sharded


def test_a_run_whose_plan_exceeds_the_budget_stops_with_the_plan_and_flags_that_fit():
    cfg = M.LLaDAConfig()
    s = Mem.Setting(cfg, micro_batch=64, prompt_len=200, completion_len=256)
    with pytest.raises(SystemExit, match="Flags that would fit: --micro-batch-size"):
        Mem.check_fits(s, torch.device("cpu"), budget_bytes=80 * Mem.GIB)
    assert Mem.check_fits(s, torch.device("cpu"), force=True, budget_bytes=80 * Mem.GIB)["total"] > 80 * Mem.GIB
    assert Mem.check_fits(s, torch.device("cpu")) is None  # CPU, no budget: no plan check
