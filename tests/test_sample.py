import math

import pytest
import torch
import torch.nn.functional as F

import sample as S
from conftest import encode_chat, llada_only


def reference_generate(model, x_prompt, attn, gen_length, block_length, steps, temperature=0.0, cfg_scale=0.0,
                       remasking="low_confidence", mask_id=2, generator=None):
    """A plain transcription of LLaDA's reference sampler: full-canvas logits, full softmax, the transfer count
    recomputed per row from the mask count, and a Python loop over rows for the top-k. The only liberty: random
    numbers are drawn with the same shapes and order as sample.generate: one draw per step for the positions of
    the current block that are still masked, row by row. LLaDA draws them for every position; each position's draw
    is independent and only a masked position's proposal is used, so this replays the same uniforms where they
    matter and leaves every position's distribution unchanged."""
    B, P = x_prompt.shape
    x = torch.cat([x_prompt, torch.full((B, gen_length), mask_id)], dim=1)
    attn = None if attn is None else torch.cat([attn, torch.ones(B, gen_length, dtype=attn.dtype)], dim=1)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :P] = True
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    for b in range(num_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        block_mask_index = x[:, s:e] == mask_id
        m = block_mask_index.sum(1, keepdim=True)
        num_transfer = (m // spb).repeat(1, spb)
        for j in range(B):
            num_transfer[j, : int(m[j] % spb)] += 1
        for i in range(spb):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = model(torch.cat([x, un_x]), None if attn is None else torch.cat([attn, attn]))
                logits, un_logits = both.chunk(2)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attn)
            blk = mask_index[:, s:e]  # (B, Lb) the block's masked positions: the same count in every row
            if temperature > 0:
                noise = torch.ones(logits.shape, dtype=torch.float64)
                u = torch.rand((B, int(blk[0].sum()), logits.shape[-1]), generator=generator, dtype=torch.float64)
                block_noise = noise[:, s:e].clone()
                block_noise[blk] = u.view(-1, logits.shape[-1])
                noise[:, s:e] = block_noise
                x0 = (logits.double().exp() / (-torch.log(noise)) ** temperature).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.float(), dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            else:
                x0_p = torch.zeros(x.shape)
                block_p = torch.zeros(B, e - s)
                block_p[blk] = torch.rand((B, int(blk[0].sum())), generator=generator).view(-1)
                x0_p[:, s:e] = block_p
            x0_p[:, e:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                _, idx = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer[j, idx] = True
            x[transfer] = x0[transfer]
    return x[:, P:]


def batch(tok, texts):
    return S.pad_left(encode_chat(tok, texts), tok.pad_token_id)


SAME_LEN = ["abcd", "wxyz", "1234"]  # equal-length prompts: no padding


@pytest.mark.parametrize("kw", [dict(), dict(remasking="random"), dict(cfg_scale=1.5), dict(temperature=0.8)],
                         ids=["greedy", "random-remasking", "cfg", "temperature"])
@llada_only
def test_exact_mode_gives_the_reference_tokens(tiny, tok, kw):
    ids, mask = batch(tok, SAME_LEN)
    ref = reference_generate(tiny, ids, None, 32, 8, 16, mask_id=tok.mask_token_id,
                             generator=torch.Generator().manual_seed(7), **kw)
    out = S.generate(tiny, ids, mask, gen_length=32, block_length=8, steps=16,
                     generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(out.completion, ref)
    assert out.forward_passes == 16
    assert not (out.completion == tok.mask_token_id).any()


def test_reference_transcription_with_padding_and_attention_mask(tiny, tok):
    ids, mask = batch(tok, ["a much longer prompt here", "short", "mid-sized one"])
    ref = reference_generate(tiny, ids, mask, 32, 16, 8, mask_id=tok.mask_token_id)
    out = S.generate(tiny, ids, mask, gen_length=32, block_length=16, steps=8)
    assert torch.equal(out.completion, ref)


def test_a_prompt_alone_equals_the_same_prompt_in_a_left_padded_batch(tiny, tok):
    alone_ids, _ = batch(tok, ["hi"])
    alone = S.generate(tiny, alone_ids, None, gen_length=48, block_length=16, steps=24).completion
    ids, mask = batch(tok, ["a considerably longer prompt", "hi", "another long prompt, padded"])
    batched = S.generate(tiny, ids, mask, gen_length=48, block_length=16, steps=24).completion
    assert torch.equal(batched[1], alone[0])


def test_transfer_schedule():
    assert S.transfer_schedule(32, 10) == [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]
    assert S.transfer_schedule(32, 32) == [1] * 32
    assert S.transfer_schedule(8, 16) == [1] * 8 + [0] * 8
    assert sum(S.transfer_schedule(37, 7)) == 37


class Spy(torch.nn.Module):
    """Wraps a model and records every canvas it is given."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.cfg, self.seen = model, model.cfg, []

    def forward(self, ids, attention_mask=None, **kw):
        self.seen.append(ids.clone())
        return self.inner(ids, attention_mask, **kw)


@llada_only
def test_block_rule_and_commit_counts(tiny, tok):
    ids, mask = batch(tok, SAME_LEN)
    P, L, Lb, steps = ids.shape[1], 32, 8, 20
    spy = Spy(tiny)
    S.generate(spy, ids, mask, gen_length=L, block_length=Lb, steps=steps)
    spb = steps // (L // Lb)
    sched = S.transfer_schedule(Lb, spb)
    for call, canvas in enumerate(spy.seen):
        b, i = divmod(call, spb)
        gen = canvas[:, P:]
        committed = (gen != tok.mask_token_id).sum(1)
        assert (gen[:, (b + 1) * Lb:] == tok.mask_token_id).all(), "a token beyond the current block was committed"
        assert (committed == b * Lb + sum(sched[:i])).all()
        if call:  # committed tokens never change
            before = spy.seen[call - 1][:, P:]
            keep = before != tok.mask_token_id
            assert torch.equal(gen[keep], before[keep])


def test_same_seed_same_samples_different_seed_different_samples(tiny, tok):
    ids, mask = batch(tok, SAME_LEN)
    run = lambda seed: S.generate(tiny, ids, mask, gen_length=32, block_length=8, steps=16, temperature=1.0,
                                  generator=torch.Generator().manual_seed(seed)).completion
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_threshold_zero_fills_a_block_per_step_and_above_one_is_one_token_per_step(tiny, tok):
    ids, mask = batch(tok, SAME_LEN)
    fast = S.generate(tiny, ids, mask, gen_length=32, block_length=8, steps=16, threshold=0.0)
    assert fast.forward_passes == 4 and not (fast.completion == tok.mask_token_id).any()
    slow = S.generate(tiny, ids, mask, gen_length=32, block_length=8, steps=16, threshold=1.01)
    assert slow.forward_passes == 32
    # one token per step, most confident first: the same as exact mode with steps = gen_length
    exact = S.generate(tiny, ids, mask, gen_length=32, block_length=8, steps=32)
    assert torch.equal(slow.completion, exact.completion)


@llada_only
def test_prefix_cache_logits_equal_the_full_forward_when_nothing_changed(tiny, tok):
    ids, mask = batch(tok, ["a longer prompt", "x"])
    canvas = torch.cat([ids, torch.full((2, 16), tok.mask_token_id)], 1)
    attn = torch.cat([mask, torch.ones(2, 16, dtype=mask.dtype)], 1)
    full, kv = tiny(canvas, attn, return_kv=True)
    s = ids.shape[1] + 4
    cache = [(k[:, :, :s], v[:, :, :s]) for k, v in kv]
    part = tiny(canvas[:, s:], attn, past_kv=cache)
    torch.testing.assert_close(part, full[:, s:], atol=1e-5, rtol=0)


@llada_only
def test_prefix_cache_runs_fewer_query_tokens_and_fills_the_canvas(tiny, tok):
    ids, mask = batch(tok, SAME_LEN)
    plain = S.generate(tiny, ids, mask, gen_length=64, block_length=16, steps=32)
    cached = S.generate(tiny, ids, mask, gen_length=64, block_length=16, steps=32, prefix_cache=True)
    assert cached.forward_passes == plain.forward_passes and cached.full_passes == 4 and plain.full_passes == 32
    assert cached.query_tokens < 0.8 * plain.query_tokens
    assert not (cached.completion == tok.mask_token_id).any()
    # (no equality with exact mode: attention is bidirectional, so the prompt's keys/values in layers >= 2 depend
    # on the block's tokens, and freezing them is an approximation even inside the first block)


@pytest.mark.parametrize("kw,msg", [
    (dict(gen_length=30, block_length=8), "not a multiple of --block-length"),
    (dict(gen_length=32, block_length=8, steps=10), "not divisible by the number of blocks"),
    (dict(mask_id=1), "equals the pad id"),
    (dict(gen_length=2048, block_length=32, steps=64), "exceeds the model's max_sequence_length"),
    (dict(remasking="top"), "low_confidence"),
    (dict(temperature=-1.0), "must be >= 0"),
    (dict(threshold=0.9, remasking="random"), "threshold decoding needs"),
])
@llada_only
def test_impossible_settings_raise_with_a_message(tiny, tok, kw, msg):
    ids, mask = batch(tok, SAME_LEN)
    args = dict(gen_length=32, block_length=8, steps=16)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        S.generate(tiny, ids, mask, **args)


@llada_only
def test_more_steps_than_tokens_warns(tiny, tok):
    ids, mask = batch(tok, ["ab", "cd"])  # two rows: the steps after the block is full see no masked position
    for kw in ({}, dict(prefix_cache=True)):
        with pytest.warns(UserWarning, match="waste"):
            out = S.generate(tiny, ids, mask, gen_length=8, block_length=8, steps=16, **kw)
        assert out.forward_passes == 16 and not (out.completion == tok.mask_token_id).any()


def test_completion_mask_keeps_tokens_up_to_and_including_the_first_eos():
    c = torch.tensor([[5, 6, 1, 1, 7], [5, 5, 5, 5, 5], [1, 9, 9, 1, 1]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(S.completion_mask(c, 1), want)


@pytest.mark.parametrize("fast", [False, True])
@llada_only
def test_show_prints_the_canvas_after_every_step_with_the_new_tokens_marked(tiny, tok, fast):
    import re
    lines = []
    ids = torch.tensor(encode_chat(tok, ["sudoku 1030020040000301"]))
    show = S.CanvasPrinter(tok, ids.shape[1], 8, tiny.cfg.mask_token_id, tiny.cfg.eos_token_id, write=lines.append)
    kw = dict(threshold=0.5, prefix_cache=True) if fast else {}
    out = S.generate(tiny, ids, gen_length=16, block_length=8, steps=8, on_step=show, **kw)
    masked = [int(re.search(r"\| +(\d+) masked", line).group(1)) for line in lines]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    if not fast:  # exact mode: one line per step, the schedule's 2 tokens committed at each
        assert len(lines) == 8 and masked == [14, 12, 10, 8, 6, 4, 2, 0]
        assert all(line.split(" masked | ")[1].count("[") >= 2 for line in lines)
    assert "block 2/2" in lines[-1]
    final = lines[-1].split(" masked | ")[1].replace("[", "").replace("]", "")
    assert "_" not in final and len(out.completion[0]) == 16
    every = []
    S.generate(tiny, ids, gen_length=16, block_length=8, steps=8, on_step=S.CanvasPrinter(
        tok, ids.shape[1], 8, tiny.cfg.mask_token_id, tiny.cfg.eos_token_id, every=3, write=every.append), **kw)
    assert len(every) < len(lines) and " 0 masked" in every[-1]
