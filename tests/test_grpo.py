import contextlib
import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import diffu_grpo as D
import model as M
from common import Trainer
import weights as W
from conftest import ARCH, TINY, launch, llada_only

TINY_RL = ["--model", TINY, "--task", "sudoku", "--prompt-style", "compact", "--train-n", "32",
           "--gen-length", "32", "--block-length", "16", "--steps", "8", "--num-generations", "3",
           "--prompts-per-step", "1", "--micro-batch-size", "3", "--lora-r", "4", "--lr", "1e-3",
           "--sample-every", "0", "--preset", "d1"]  # d1's values for every flag not given, on the tiny model


def test_prompt_mask_patterns_rate_padding_and_freshness():
    attn = torch.ones(64, 200, dtype=torch.long)
    attn[:, :50] = 0  # left padding is never masked
    pats = D.prompt_mask_patterns(torch.Generator().manual_seed(0), 4, attn, 0.15)
    assert pats.shape == (4, 64, 200)
    assert not pats[:, :, :50].any()
    rate = pats[:, :, 50:].float().mean().item()
    assert abs(rate - 0.15) < 0.01
    assert not torch.equal(pats[0], pats[1])


def test_masked_input_masks_the_pattern_and_the_whole_completion():
    prompt = torch.arange(10, 20).repeat(2, 1)
    pat = torch.zeros(2, 10, dtype=torch.bool)
    pat[0, 3] = pat[1, 7] = True
    x = D.masked_input(prompt, pat, 5, mask_id=2)
    assert x.shape == (2, 15) and (x[:, 10:] == 2).all()
    assert x[0, 3] == 2 and x[1, 7] == 2 and (x[:, :10] != 2).sum() == 18


def toy_rollouts(seed, mu, padded_row, pad):
    """3 random prompts (9 tokens, one row left-padded by `pad`), their 6-token completions, mu mask patterns."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 100, (3, 9), generator=g)
    attn = torch.ones_like(prompt)
    attn[padded_row, :pad] = 0
    completion = torch.randint(3, 100, (3, 6), generator=g)
    return prompt, attn, completion, D.prompt_mask_patterns(g, mu, attn, 0.3)


def test_per_token_logps_equal_a_manual_log_softmax_gather(tiny):
    prompt, attn, completion, pats = toy_rollouts(0, 1, padded_row=1, pad=4)
    pat = pats[0]
    got = D.per_token_logps(tiny, prompt, attn, completion, pat, tiny.cfg.mask_token_id, micro_batch=2)
    x = D.masked_input(prompt, pat, 6, tiny.cfg.mask_token_id)
    full_attn = torch.cat([attn, torch.ones(3, 6, dtype=attn.dtype)], 1)
    logp = F.log_softmax(tiny(x, full_attn), -1)[:, 9:]
    want = logp.gather(-1, completion[..., None]).squeeze(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_all_patterns_in_one_stacked_batch_equal_one_call_per_pattern(tiny):
    prompt, attn, completion, pats = toy_rollouts(1, 4, padded_row=2, pad=3)
    want = torch.stack([D.per_token_logps(tiny, prompt, attn, completion, pats[j], tiny.cfg.mask_token_id)
                        for j in range(4)])
    b = D.Rollouts(prompt, attn, completion, torch.zeros(3), torch.ones(completion.shape))
    for mb in (12, 5):  # all 4 x 3 rows at once, and micro-batches that straddle two patterns
        got = D.estimates(tiny, D.D1, b, {"prompt": pats}, None, mb)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_loss_equals_a_hand_computation_with_clipping_on_both_sides_and_kl():
    eps, beta = 0.2, 0.1
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.1, -3.0]])
    old = torch.tensor([[-1.5, -2.0, -0.1], [-1.0, -0.8, -3.0]])  # ratios e^0.5 (high), 1, e^-0.4 (low), ...
    ref = torch.tensor([[-1.2, -1.0, -0.5], [-1.5, -0.3, -2.0]])
    adv = torch.tensor([1.0, -2.0])
    cmask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    total, stats = D.grpo_token_loss(logp, old, ref, adv, cmask, eps, beta)
    want, clipped, kl_sum = 0.0, 0, 0.0
    for b in range(2):
        for k in range(3):
            if not cmask[b, k]:
                continue
            r = math.exp(logp[b, k] - old[b, k])
            A = adv[b].item()
            surr = min(r * A, min(max(r, 1 - eps), 1 + eps) * A)
            d = (ref[b, k] - logp[b, k]).item()
            kl = math.exp(d) - d - 1
            want += -surr + beta * kl
            kl_sum += kl
            clipped += (r > 1 + eps and A > 0) or (r < 1 - eps and A < 0)
    assert clipped == 2  # the high side (A > 0) and the low side (A < 0) are both exercised
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert stats["clipped"].item() == clipped and stats["kl"].item() == pytest.approx(kl_sum, rel=1e-6)


def test_identical_rewards_give_zero_advantages_and_no_nan():
    r = torch.tensor([1.0, 1.0, 1.0, 0.5, 1.5, 1.0])
    for scale in (False, True):
        a = D.group_advantages(r, 3, scale)
        assert torch.isfinite(a).all() and (a[:3] == 0).all()
    assert torch.allclose(D.group_advantages(r, 3), torch.tensor([0, 0, 0, -0.5, 0.5, 0.0]))
    logp = torch.full((3, 4), -1.0, requires_grad=True)
    loss, _ = D.grpo_token_loss(logp, logp.detach(), logp.detach() - 0.1, torch.zeros(3), torch.ones(3, 4), 0.5, 0.04)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


class Recorder(torch.nn.Module):
    """Wraps a LoRA model; records (input, adapters on?) of every full-completion log-prob pass."""

    def __init__(self, inner, L):
        super().__init__()
        self.inner, self.cfg, self.L, self.calls = inner, inner.cfg, L, []

    def forward(self, ids, attention_mask=None, **kw):
        sl = kw.get("logits_slice")
        if sl is not None and sl.stop - sl.start == self.L and ids.shape[1] == sl.stop:
            on = next(m for m in self.inner.modules() if isinstance(m, M.LoRALinear)).enabled
            self.calls.append((ids.clone(), on))
        return self.inner(ids, attention_mask, **kw)


def run_one_batch(tiny, tok, mu, beta, G=3, extra=()):
    M.apply_lora(tiny, 4, 8, generator=torch.Generator().manual_seed(0))
    args = D.get_args(TINY_RL + ["--num-iterations", str(mu), "--beta", str(beta), "--num-generations", str(G),
                                 "--micro-batch-size", str(2 * G), "--p-mask-prompt", "0.3", *extra])
    rec = Recorder(tiny, args.gen_length)
    params = [p for p in tiny.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    policy = D.Policy(rec)
    from data import load_task
    rows = [load_task("sudoku", "train", style="compact", n=2)[i] for i in range(2)]
    gens = {k: torch.Generator().manual_seed(i) for i, k in enumerate(("rollout", "mask"))}
    metrics, _ = D.rl_step(policy, Trainer(rec, opt, sched, params), rows, tok, args, gens)
    return rec, policy, metrics, opt


def test_old_ref_and_current_use_the_same_pattern_j_and_patterns_differ_between_iterations(tiny, tok):
    mu = 3
    rec, policy, metrics, opt = run_one_batch(tiny, tok, mu=mu, beta=0.04)
    assert len(rec.calls) == 3 * mu  # old (mu), reference (mu), current (mu): every pattern used
    old, ref, cur = rec.calls[:mu], rec.calls[mu:2 * mu], rec.calls[2 * mu:]
    assert all(on for _, on in old) and not any(on for _, on in ref) and all(on for _, on in cur)
    P = old[0][0].shape[1] - 32
    for j in range(mu):
        assert torch.equal(old[j][0], ref[j][0]) and torch.equal(old[j][0], cur[j][0])
        assert (old[j][0][:, P:] == tiny.cfg.mask_token_id).all()  # completion fully masked
    assert not torch.equal(old[0][0], old[1][0])
    assert policy.ref_passes == mu
    assert opt.state[next(iter(opt.state))]["step"].item() == mu  # one optimizer step per inner iteration


def test_logp_batch_size_stacks_the_old_and_reference_passes_of_all_iterations(tiny, tok):
    mu, N = 3, 6
    rec, policy, metrics, _ = run_one_batch(tiny, tok, mu=mu, beta=0.04, extra=["--logp-batch-size", str(mu * N)])
    sizes = [ids.shape[0] for ids, _ in rec.calls]
    assert sizes == [mu * N, mu * N] + [N] * mu  # old: 1 call, reference: 1 call, then mu update passes
    old, ref, cur = rec.calls[0][0].view(mu, N, -1), rec.calls[1][0].view(mu, N, -1), rec.calls[2:]
    for j in range(mu):
        assert torch.equal(old[j], ref[j]) and torch.equal(old[j], cur[j][0])  # pattern j throughout
    assert policy.ref_passes == mu and math.isfinite(metrics["loss"])


def test_mu_one_has_ratio_exactly_one_and_beta_zero_makes_no_reference_pass(tiny, tok):
    rec, policy, metrics, _ = run_one_batch(tiny, tok, mu=1, beta=0.04)  # d1's code crashes here
    assert policy.ref_passes == 1 and len(rec.calls) == 2  # ref + current; no separate old pass
    assert metrics["clip_ratio/region_mean"] == 0.0
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["kl"])
    tiny2 = M.LLaDA(tiny.cfg).init_weights(torch.Generator().manual_seed(0)).eval()
    rec, policy, metrics, _ = run_one_batch(tiny2, tok, mu=2, beta=0.0)
    assert policy.ref_passes == 0 and len(rec.calls) == 4 and all(on for _, on in rec.calls)


def test_repeated_masks_make_one_reference_pass_and_no_old_pass_and_give_the_same_weights(tiny):
    """--p-mask-prompt 0 draws the same (empty) prompt mask for every update, so every update's estimates are equal
    before the first step: one reference pass must serve all mu updates and old must be update 0's own estimate,
    and the weights must end bit for bit where mu separate old and reference passes take them."""
    mu = 3
    args = D.get_args(TINY_RL + ["--num-iterations", str(mu), "--beta", "0.04", "--p-mask-prompt", "0",
                                 "--micro-batch-size", "3"])  # the old passes batch rows as the updates do
    M.apply_lora(tiny, 4, 8, generator=torch.Generator().manual_seed(0))
    prompt, attn, completion, _ = toy_rollouts(2, 1, padded_row=0, pad=2)
    b = D.Rollouts(prompt, attn, completion, torch.tensor([1.0, -0.5, -0.5]), torch.ones(completion.shape))
    masks = D.D1.draw(torch.Generator().manual_seed(0), mu, attn, b.cmask, args)  # (mu, 3, 9), all False
    start, ends = [p.detach().clone() for p in tiny.parameters() if p.requires_grad], []
    for separate in (True, False):
        model = copy.deepcopy(tiny).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        tr = Trainer(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), params)
        policy = D.Policy(model)
        if separate:  # mu passes each, as for masks that differ
            old = D.estimates(model, D.D1, b, masks, args, 3)
            with policy.ref_context():
                ref = D.estimates(model, D.D1, b, masks, args, 3)
        else:
            old, ref, _, passes = D.old_and_ref(policy, D.D1, b, masks, args, contextlib.nullcontext())
            assert old is None and passes == 1 and policy.ref_passes == 1 and ref.shape == (mu, 3, 6)
        D.updates(tr, D.D1, b, masks, old, ref, args)
        assert opt.state[params[0]]["step"].item() == mu
        ends.append([p.detach().clone() for p in params])
    assert all(torch.equal(x, y) for x, y in zip(*ends)) and not all(torch.equal(x, y) for x, y in zip(start, ends[0]))
    for m in tiny.modules():  # LoRA dropout: an update's estimate is noisy, so old and ref get their mu passes again
        if isinstance(m, M.LoRALinear):
            m.dropout = 0.05
    old, ref, _, passes = D.old_and_ref(D.Policy(tiny), D.D1, b, masks, args, contextlib.nullcontext())
    assert old.shape == ref.shape == (mu, 3, 6) and passes == 2 * mu


def test_ratio_is_one_and_loss_is_minus_mean_advantage_at_the_first_inner_update(tiny, tok, monkeypatch):
    """At the first inner update the weights are those that produced the old log-probs, so (without dropout) the
    ratio is 1 and the surrogate is -A per token: the loss must equal -sum(A_i * valid tokens_i) / valid tokens, a
    number computed here from the advantages and the completion mask alone. At the second update the weights have
    moved, so the ratio is no longer 1."""
    monkeypatch.setitem(D.REWARDS, "sudoku", [(digits_reward, 1.0)])
    seen = []
    real = D.grpo_token_loss
    monkeypatch.setattr(D, "grpo_token_loss", lambda logp, old, ref, adv, cmask, eps, beta:
                        seen.append((logp.detach(), old, adv, cmask)) or real(logp, old, ref, adv, cmask, eps, beta))
    rec, policy, metrics, _ = run_one_batch(tiny, tok, mu=2, beta=0.0, G=4)
    assert len(seen) == 2  # one micro-batch per inner update
    (logp0, old0, adv, cmask), (logp1, old1, _, _) = seen
    assert adv.abs().sum() > 0, "the batch needs non-zero advantages to test anything"
    torch.testing.assert_close(logp0, old0, atol=1e-5, rtol=0)
    assert not torch.allclose(logp1, old1, atol=1e-4)
    first = -(adv[:, None] * cmask).sum() / cmask.sum()
    loss0, _ = real(logp0, old0, None, adv, cmask, 0.5, 0.0)
    torch.testing.assert_close(loss0 / cmask.sum(), first, atol=1e-5, rtol=0)


def test_rollouts_use_the_deterministic_policy_unless_rollout_mode_train(tiny, tok):
    """Rollouts and old log-probs come from the model in eval mode: LoRA dropout (0.5 here) does not touch them, so
    they do not depend on the global RNG. --rollout-mode train (d1's trainer) samples with dropout on."""
    M.apply_lora(tiny, 4, 8, dropout=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in tiny.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    from data import load_task
    rows = [load_task("sudoku", "train", style="compact", n=2)[i] for i in range(2)]

    def completions(mode, global_seed):
        state = {k: v.clone() for k, v in tiny.state_dict().items()}
        args = D.get_args(TINY_RL + ["--num-iterations", "1", "--beta", "0", "--rollout-mode", mode])
        params = [p for p in tiny.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        gens = {k: torch.Generator().manual_seed(i) for i, k in enumerate(("rollout", "mask"))}
        torch.manual_seed(global_seed)
        _, samples = D.rl_step(D.Policy(tiny), Trainer(tiny, opt, sched, params), rows, tok, args, gens)
        tiny.load_state_dict(state)
        return [c for _, c, _ in samples]

    assert completions("eval", 0) == completions("eval", 1)
    assert any(completions("train", s) != completions("train", 0) for s in (1, 2, 3))


def test_prompt_truncation_is_counted_and_off_by_default(tiny, tok):
    _, _, metrics, _ = run_one_batch(tiny, tok, mu=1, beta=0.0)
    assert metrics["prompts/truncated"] == 0.0
    tiny2 = M.LLaDA(tiny.cfg).init_weights(torch.Generator().manual_seed(0)).eval()
    rec, _, metrics, _ = run_one_batch(tiny2, tok, mu=1, beta=0.0, extra=["--max-prompt-length", "10"])
    assert metrics["prompts/truncated"] == 1.0  # every compact Sudoku prompt is longer than 10 tokens
    assert rec.calls[0][0].shape[1] == 10 + 32  # the prompt kept its last 10 tokens, then the 32-token completion


def test_torchrun_two_ranks_gloo_stay_in_sync(tmp_path):
    out = launch("diffu_grpo.py", TINY_RL + ["--num-iterations", "1", "--max-steps", "2", "--out-dir", str(tmp_path)],
                 nproc=2)
    assert "ranks in sync: True" in out.stdout
    assert (tmp_path / "final" / "config.json").exists()


def digits_reward(prompts, completions, **kw):
    """A reward that varies within a group even for a random model (so the advantages are not all zero)."""
    return [sum(ch.isdigit() for ch in c) / 10 for c in completions]


def test_rl_from_an_sft_adapter_starts_at_the_sft_model_and_its_reference_is_the_sft_model(tmp_path, tok,
                                                                                            monkeypatch):
    """d1 starts RL from the SFT model. The SFT adapter (--adapter) is kept exactly (frozen factors): the policy
    starts AT the SFT model, the reference policy (trainable adapters off) IS the SFT model, and after RL steps the
    exact export reloads the trained policy."""
    sft, _ = W.build(TINY, seed=0)
    M.apply_lora(sft, 4, 8, targets=("q_proj", "k_proj", "v_proj"), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    W.save_model(sft, str(tmp_path / "sft"), tok)  # base + adapter.safetensors
    monkeypatch.setitem(D.REWARDS, "sudoku", [(digits_reward, 1.0)])
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    sft_logits = sft(ids).detach()
    out = tmp_path / "rl"
    policy = D.main(TINY_RL + ["--adapter", str(tmp_path / "sft" / W.ADAPTER_FILE), "--num-iterations", "2",
                               "--max-steps", "2", "--beta", "0.04", "--out-dir", str(out)])
    model = policy.model.eval()  # (no LoRA dropout)
    with M.lora_disabled(model):
        torch.testing.assert_close(model(ids), sft_logits, atol=1e-5, rtol=0)
    trained = model(ids).detach()
    assert not torch.allclose(trained, sft_logits, atol=1e-5)  # RL moved the policy
    torch.testing.assert_close(W.load_model(str(out / "final"))(ids), trained, atol=1e-6, rtol=0)


def test_diffu_grpo_with_d1s_knobs_raises_the_expected_reward_of_its_policy(monkeypatch, tmp_path):
    """It learns, end to end through diffu_grpo.main, with d1's own knobs on (mu = 2 inner updates on fresh prompt-mask
    patterns, p_mask 0.15, beta 0.04 with the k3 KL): from a random tiny model, a reward that pays for the digit '7'.
    Measured without sampling noise: with one-step decoding the policy draws each completion position from the
    fully masked marginals, so its expected reward is the mean probability of '7' there. Checked over seeds 0-2 with
    native and portable (ATEN_CPU_CAPABILITY=default) kernels: from 0.001-0.013 to 0.20-0.64 (worst gain +0.20);
    the assertion asks for a tenth of the worst gain. (Whether RL beats SFT on Sudoku is a question for the sweep,
    runs/tiny_sudoku_sweep.sh, not for a test: its margin in the worst run is within a short test's noise.)"""
    tok = M.tiny_tokenizer(ARCH)
    seven = tok.convert_tokens_to_ids("7")
    monkeypatch.setitem(D.REWARDS, "sudoku", [(lambda prompts, completions, **kw:
                                               [c.count("7") / max(1, len(c)) for c in completions], 1.0)])
    from data import load_task
    rows = list(load_task("sudoku", "test", style="compact", n=32))
    ids = torch.tensor([tok(tok.apply_chat_template(r["prompt"], tokenize=False), add_special_tokens=False)
                        ["input_ids"] for r in rows])

    def expected_reward(model):
        x = torch.cat([ids, torch.full((len(rows), 16), model.cfg.mask_token_id)], 1)
        with torch.no_grad():
            return model.eval()(x)[:, ids.shape[1]:].softmax(-1)[..., seven].mean().item()

    before = expected_reward(W.build(TINY, seed=0)[0])
    policy = D.main(["--model", TINY, "--task", "sudoku", "--prompt-style", "compact", "--train-n", "64",
                     "--gen-length", "16", "--block-length", "16", "--steps", "1", "--temperature", "1.0",
                     "--num-generations", "8", "--prompts-per-step", "4", "--micro-batch-size", "32", "--lora-r", "0",
                     "--lr", "1e-3", "--num-iterations", "2", "--max-steps", "40", "--beta", "0.04",
                     "--p-mask-prompt", "0.15", "--sample-every", "0", "--no-export", "--seed", "0", "--preset", "d1",
                     "--out-dir", str(tmp_path)])
    after = expected_reward(policy.model)
    assert after > before + 0.02 and after > 3 * before, (before, after)


def test_resume_continues_exactly_and_rollouts_do_not_depend_on_the_global_rng(tmp_path):
    """Rollout noise and mask patterns come from generators seeded by (seed, rank, batch), so a run halted after
    two rollout batches and resumed from its checkpoint exports exactly the weights of an uninterrupted run."""
    args = TINY_RL + ["--num-iterations", "2", "--max-steps", "8", "--save-every", "4", "--p-mask-prompt", "0.3"]
    D.main(args + ["--out-dir", str(tmp_path / "straight")])
    D.main(args + ["--out-dir", str(tmp_path / "halted"), "--halt-after", "4"])
    assert not (tmp_path / "halted" / "final").exists()
    torch.manual_seed(12345)  # a different global RNG state must not matter
    D.main(args + ["--out-dir", str(tmp_path / "halted"), "--resume"])
    a = W.load_model(str(tmp_path / "straight" / "final")).state_dict()
    b = W.load_model(str(tmp_path / "halted" / "final")).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rl_validation_prompts_are_disjoint_from_training_prompts_and_test_items():
    from data import rl_split
    from data.sudoku import split_grids, validation_grids
    train, val = rl_split("sudoku", None, "compact", 2000, 64, 0, (3, 6))
    held = set(validation_grids())
    assert len(val) == 64 and set(val["solution"]) <= held and not held & set(train["solution"])
    assert not set(val["solution"]) & set(split_grids()[1])  # no test grid
    assert len(train) > 1500
    train, val = rl_split("countdown", "generate", "compact", 100, 10, 0)
    assert len(train) == 100 and len(val) == 10
    assert not {(tuple(r["nums"]), r["target"]) for r in val} & {(tuple(r["nums"]), r["target"]) for r in train}


def test_eval_every_keeps_the_best_validation_step_ties_the_earlier_and_names_it(tmp_path, monkeypatch, capsys):
    """Scripted validation accuracies 0.1, 0.5, 0.5, 0.2 at steps 0, 2, 4, 6: the export holds step 2's weights
    (the best; step 4 ties and the earlier wins), and the run says which step it kept and why."""
    def fake_validation(*a, **k):
        scripted = iter([0.1, 0.5, 0.5, 0.2])

        return lambda: {"eval_accuracy": next(scripted), "eval_reward": 0.0}
    monkeypatch.setattr(D, "validation", fake_validation)
    args = TINY_RL + ["--lora-r", "0", "--num-iterations", "2", "--max-steps", "6", "--eval-every", "2"]
    D.main(args + ["--keep-best", "--out-dir", str(tmp_path / "best")])
    assert "kept the weights of step 2: the best validation accuracy, 0.5000, of 4 evaluations" in capsys.readouterr().out
    meta = json.load(open(tmp_path / "best" / "final" / "meta.json"))
    assert meta["best_step"] == 2
    D.main(args + ["--halt-after", "2", "--out-dir", str(tmp_path / "two")])  # the same prompts, stopped at 2
    a = W.load_model(str(tmp_path / "best" / "final")).state_dict()
    b = W.load_model(str(tmp_path / "two" / "checkpoint")).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logged = [json.loads(line) for line in open(tmp_path / "best" / "metrics.jsonl")]
    assert [r["step"] for r in logged if "eval_accuracy" in r] == [0, 2, 4, 6]


@llada_only  # --prefix-cache is among the flags, and Dream refuses it
def test_every_sampling_flag_diffu_grpo_accepts_reaches_the_sampler(tiny, tok, monkeypatch):
    """A sampling flag that is accepted and not used is a silent lie (--prefix-cache once was): each of the
    sampler's flags, set to a non-default value, must arrive in the rollout's generate call."""
    from sample import SAMPLING_FLAGS
    seen = {}
    real = D.generate
    monkeypatch.setattr(D, "generate", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    values = {"gen_length": 16, "block_length": 8, "steps": 4, "temperature": 0.7, "cfg_scale": 0.5,
              "remasking": "low_confidence", "threshold": 0.8, "prefix_cache": True}
    # every flag of LLaDA's block sampler; Dream's (--alg ...) are sample.py's and eval.py's: rollouts keep d1's sampler
    fields = {f.name for f in dataclasses.fields(D.GRPOConfig)}
    assert set(values) == set(SAMPLING_FLAGS) & fields and "alg" in SAMPLING_FLAGS and "alg" not in fields
    argv = []
    for k, v in values.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    M.apply_lora(tiny, 4, 8, generator=torch.Generator().manual_seed(0))
    args = D.get_args(TINY_RL + ["--num-iterations", "1", "--beta", "0"] + argv)
    params = [p for p in tiny.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    from data import load_task
    rows = [load_task("sudoku", "train", style="compact", n=1)[0]]
    gens = {k: torch.Generator().manual_seed(i) for i, k in enumerate(("rollout", "mask"))}
    D.rl_step(D.Policy(tiny), Trainer(tiny, opt, sched, params), rows, tok, args, gens)
    assert {k: seen[k] for k in values} == values
