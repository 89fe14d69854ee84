import re

import torch

import bench
import diffu_grpo as D
import model as M
import sample as S
from conftest import ARCH

SMALL = ["--config", "cpu-small", "--batch", "2", "--prompt-len", "16", "--gen-length", "32", "--block-length", "16",
         "--steps", "4", "--mu", "2", "--lora-r", "8"]


def test_bench_runs_every_section_and_writes_its_tables(tmp_path):
    """The harness end to end on LLaDA's real 126,464-token vocabulary with tiny shapes: the sampler table (our exact
    sampler commits the same tokens as the reference-style loop), the log-prob pass, and the GRPO step of both sides
    (ours and the d1-style one), whose phase times add up to at most their whole step."""
    out = tmp_path / "bench.md"
    bench.main(SMALL + ["--out", str(out)])
    text = out.read_text()
    exact = next(line for line in text.splitlines() if line.startswith("| ours, exact |"))
    assert exact.rstrip().endswith("| yes |"), exact
    assert "One-step log-prob estimator" in text and "One step of the reference-style loop: forward" in text
    rows = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(
        r"^\| (generation|rewards|old \+ ref log-probs|inner updates|whole step) \| ([\d.]+) \| ([\d.]+) \|", text,
        re.M)}
    assert set(rows) == {"generation", "rewards", "old + ref log-probs", "inner updates", "whole step"}
    for side in (0, 1):
        assert sum(v[side] for k, v in rows.items() if k != "whole step") <= rows["whole step"][side] + 0.02
    assert re.search(r"generated tokens/s, [\d.]+ s per rollout batch", text)


def test_the_d1_style_passes_compute_our_numbers():
    """bench's d1-style step differs from ours in cost only: its full-sequence log-prob pass gives our
    per_token_logps, and its sampler (noise in the model's dtype, autograd on) our greedy tokens."""
    tok = M.tiny_tokenizer(ARCH)
    model = M.LLaDA(M.tiny_config(tok, arch=ARCH)).init_weights(torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(7, 104, (3, 9), generator=g)
    attn = torch.ones_like(prompt)
    completion = torch.randint(7, 104, (3, 8), generator=g)
    pattern = torch.rand(3, 9, generator=g) < 0.3
    mask_id = model.cfg.mask_token_id
    with torch.no_grad():
        ours = D.per_token_logps(model, prompt, attn, completion, pattern, mask_id)
        theirs = bench.d1_style_logps(model, prompt, attn, completion, pattern, mask_id)
    torch.testing.assert_close(theirs, ours)
    out, passes = bench.reference_style_generate(model, prompt, attn, 8, 4, 4, 0.0, mask_id, grad=True,
                                                 noise_dtype=torch.float32)
    assert passes == 4
    assert torch.equal(out, S.generate(model, prompt, attn, gen_length=8, block_length=4, steps=4).completion)
