"""methods.py: wd1, SPG and ESPO, each against a hand computation (masks, estimate, loss), the form of its first
update, micro-batch independence, 2 gloo ranks = 1, and the flags each method refuses."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import diffu_grpo as D
import methods
from common import Trainer
from conftest import TINY, launch

BASE = ["--model", TINY, "--gen-length", "16", "--block-length", "8", "--steps", "2", "--num-generations", "3"]


def cfg_for(method, *extra):
    return methods.get_args(BASE + ["--method", method, *extra])


def toy_batch(seed, N=6, P=7, L=16, lengths=None):
    """N random prompts (row 1 left-padded by 2) and completions; cmask: the first lengths[i] tokens valid."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 100, (N, P), generator=g)
    attn = torch.ones(N, P, dtype=torch.long)
    attn[1, :2] = 0
    completion = torch.randint(3, 100, (N, L), generator=g)
    lengths = lengths or [L] * N
    cmask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).float()
    return prompt, attn, completion, cmask


def logp_by_hand(model, prompt, attn, completion, prompt_mask, comp_mask):
    """log p(o_k | x) (L,) for ONE row: x built position by position, a full forward, log_softmax, gather."""
    x = torch.cat([prompt, completion]).clone()
    P = len(prompt)
    for k in range(len(x)):
        if (k < P and prompt_mask[k]) or (k >= P and comp_mask[k - P]):
            x[k] = model.cfg.mask_token_id
    a = torch.cat([attn, torch.ones_like(completion)])
    logits = model(x[None], a[None])[0, P:]
    return F.log_softmax(logits.float(), -1).gather(-1, completion[:, None]).squeeze(-1)


# --- wd1 ---------------------------------------------------------------------------------------------------------


def test_wd1_weights_sum_to_zero_in_each_group_and_the_loss_weighs_summed_token_log_likelihoods(tiny):
    adv = torch.tensor([1.0, 0.0, -1.0, 0.5, 0.5, 0.5])
    w = methods.wd1_coefficients(adv, 3)
    e = [math.exp(a) for a in (1.0, 0.0, -1.0)]
    want = [e[2 - i] / sum(e) - e[i] / sum(e) for i in range(3)]  # softmax(-A)_i - softmax(+A)_i
    torch.testing.assert_close(w[:3], torch.tensor(want))
    assert abs(w[:3].sum()) < 1e-7 and w[0] < 0 < w[2]  # the best completion is pushed up, the worst down
    assert torch.equal(w[3:], torch.zeros(3))  # equal rewards: nothing to learn
    cfg = cfg_for("wd1")
    prompt, attn, completion, cmask = toy_batch(0, lengths=[16, 5, 9, 16, 2, 11])
    masks = methods.wd1_draw(torch.Generator().manual_seed(0), 1, attn, cmask, cfg)
    est = methods.wd1_estimate(tiny, prompt, attn, completion, cmask, {"prompt": masks["prompt"][0]}, cfg)
    for i in range(6):  # d1's masks (the whole completion), the log-likelihood SUMMED over valid tokens
        lp = logp_by_hand(tiny, prompt[i], attn[i], completion[i], masks["prompt"][0, i], torch.ones(16, dtype=bool))
        torch.testing.assert_close(est[i], (lp * cmask[i]).sum(), atol=1e-4, rtol=1e-5)
    loss, _ = methods.wd1_loss(est, None, None, w, cmask, cfg)
    torch.testing.assert_close(loss, sum(w[i] * est[i] for i in range(6)))


# --- SPG ---------------------------------------------------------------------------------------------------------


def test_spg_masks_follow_the_block_rule():
    """With p_mask 0 the completion mask of a copy is: a random subset of 1..c_max valid tokens of one block b that
    holds valid tokens, every position after b, and every position after the first EOS; nothing before b."""
    cfg = cfg_for("spg", "--p-mask-prompt", "0", "--gen-length", "32", "--steps", "4", "--spg-copies", "3")
    lengths = [32, 20, 8, 3]
    _, attn, _, cmask = toy_batch(0, N=4, L=32, lengths=lengths)
    masks = methods.spg_draw(torch.Generator().manual_seed(0), 200, attn, cmask, cfg)
    comp = masks["completion"]
    assert comp.shape == (200, 4, 3, 32) and not masks["prompt"].any()
    blocks_seen = {i: set() for i in range(4)}
    for j in range(200):
        for i, n in enumerate(lengths):
            for c in range(3):
                m = comp[j, i, c]
                b = int(m.nonzero()[0]) // 8  # the first masked position lies in block b
                assert b < -(-n // 8) and m[(b + 1) * 8:].all() and m[n:].all() and not m[:b * 8].any()
                inside = m[b * 8:min((b + 1) * 8, n)]
                assert 1 <= int(inside.sum()) <= len(inside)
                blocks_seen[i].add(b)
    assert blocks_seen == {0: {0, 1, 2, 3}, 1: {0, 1, 2}, 2: {0}, 3: {0}}
    cfg = cfg_for("spg", "--p-mask-prompt", "0.3", "--gen-length", "32", "--steps", "4")
    masks = methods.spg_draw(torch.Generator().manual_seed(1), 400, attn, cmask, cfg)
    p = masks["prompt"]
    assert not p[:, 1, :, :2].any()  # left padding is never masked
    assert abs(p[:, :, :, 2:].float().mean().item() - 0.3) < 0.02  # real prompt tokens w.p. p_mask


def test_spg_bounds_and_loss_equal_a_hand_computation_and_the_elbo_is_the_1_over_t_weighted_one(tiny):
    cfg = cfg_for("spg", "--spg-beta", "1.5", "--spg-omega", "0.3")
    prompt, attn, completion, cmask = toy_batch(3, N=3, lengths=[16, 7, 12])
    masks = methods.spg_draw(torch.Generator().manual_seed(0), 1, attn, cmask, cfg)
    masks = {k: v[0] for k, v in masks.items()}
    est = methods.spg_estimate(tiny, prompt, attn, completion, cmask, masks, cfg)
    beta, m = 1.5, 2
    for i in range(3):
        n = int(cmask[i].sum())
        lps = [logp_by_hand(tiny, prompt[i], attn[i], completion[i], masks["prompt"][i, c], masks["completion"][i, c])
               for c in range(m)]
        M = [[bool(masks["completion"][i, c, k]) and k < n for k in range(16)] for c in range(m)]
        t = [sum(M[c]) / n for c in range(m)]
        elbo = sum(sum(lps[c][k].item() for k in range(16) if M[c][k]) / (t[c] * n) for c in range(m)) / m
        logs = [math.log(sum(math.exp(beta * lps[c][k].item()) / t[c] for c in range(m) if M[c][k]) / m)
                for k in range(16) if any(M[c][k] for c in range(m))]
        assert est[i, 0].item() == pytest.approx(elbo, rel=1e-4)
        assert est[i, 1].item() == pytest.approx(sum(logs) / len(logs) / beta, rel=1e-4)
    adv = torch.tensor([0.7, -0.2, 0.0])  # positive -> ELBO; negative and zero -> the mixture
    loss, _ = methods.spg_loss(est, None, None, adv, cmask, cfg)
    mix = lambda i: 0.3 * est[i, 1] + 0.7 * est[i, 0]
    want = -(0.7 * 16 * est[0, 0] - 0.2 * 7 * mix(1) + 0.0 * 12 * mix(2))
    torch.testing.assert_close(loss, want)
    for mode, neg in (("elbo", est[1, 0]), ("eubo", est[1, 1])):
        got, _ = methods.spg_loss(est, None, None, adv, cmask, cfg_for("spg", "--spg-mode", mode))
        torch.testing.assert_close(got, -(0.7 * 16 * est[0, 0] - 0.2 * 7 * neg))


# --- ESPO --------------------------------------------------------------------------------------------------------


def test_espo_mask_counts_are_stratified_over_the_batch_and_cover_the_whole_generation():
    cfg = cfg_for("espo", "--espo-mc", "3")
    _, attn, _, cmask = toy_batch(0, N=5, lengths=[16, 3, 8, 1, 10])
    masks = methods.espo_draw(torch.Generator().manual_seed(0), 4, attn, cmask, cfg)
    comp = masks["completion"]
    assert list(masks) == ["completion"] and comp.shape == (4, 5, 3, 16)  # the prompt is never masked
    counts = comp.sum(-1)  # (mu, N, M)
    L = 16
    for j in range(4):
        for d in range(3):
            x = counts[j, :, d].tolist()
            assert any(x == [round(k + i * (L + 1) / 5) % (L + 1) for i in range(5)] for k in range(L + 1)), x
    # EOS padding counts: positions past a completion's end are masked as often as any other
    assert comp[:, 3, :, 1:].float().mean() > 0.3


def test_espo_elbo_and_loss_equal_a_hand_computation(tiny):
    cfg = cfg_for("espo", "--espo-mc", "2")
    prompt, attn, completion, cmask = toy_batch(4, N=3)
    masks = methods.espo_draw(torch.Generator().manual_seed(5), 1, attn, cmask, cfg)["completion"][0]
    est = methods.espo_estimate(tiny, prompt, attn, completion, cmask, {"completion": masks}, cfg)
    L, none = 16, torch.zeros(7, dtype=torch.bool)
    for i in range(3):
        terms = []
        for d in range(2):
            x = int(masks[i, d].sum())
            prim = logp_by_hand(tiny, prompt[i], attn[i], completion[i], none, masks[i, d])
            comp = logp_by_hand(tiny, prompt[i], attn[i], completion[i], none, ~masks[i, d])
            a = (prim[masks[i, d]].sum().item() * (L + 1) / x) if x else 0.0
            b = (comp[~masks[i, d]].sum().item() * (L + 1) / (L - x)) if x < L else 0.0
            terms.append((a + b) / 2)
        assert est[i].item() == pytest.approx(sum(terms) / 2, rel=1e-4)
    # the loss: sequence ratio exp((ELBO - old) / L), clipped at 1 +- 0.2, and 0.01 * k2 KL
    e, old, ref = torch.tensor([8.0, -8.0, 0.0]), torch.zeros(3), torch.tensor([0.0, 0.0, 4.0])
    adv = torch.tensor([1.0, -1.0, 0.5])
    loss, st = methods.espo_loss(e, old, ref, adv, torch.ones(3, L), cfg)
    r = math.exp(0.5), math.exp(-0.5)
    surrogate = min(r[0], 1.2) - max(r[1], 0.8) + 0.5  # min(rho A, clip(rho) A) per row
    kl = 0.5 * (64 + 64 + 16) / L
    assert loss.item() == pytest.approx(-surrogate + 0.01 * kl, rel=1e-6)
    assert st["clipped"].item() == 2 and st["kl"].item() == pytest.approx(kl)


# --- the shared loop ---------------------------------------------------------------------------------------------


def run_updates(tiny, method, micro_batch, first_update=None):
    """One rollout batch's mu = 2 updates (SGD) of a copy of `tiny`, full fine-tuning with a frozen reference."""
    model = copy.deepcopy(tiny)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = cfg_for(method, "--num-iterations", "2", "--micro-batch-size", str(micro_batch))
    prompt, attn, completion, cmask = toy_batch(7, lengths=[16, 4, 9, 16, 12, 2])
    adv = D.group_advantages(torch.tensor([1.0, 0.0, 0.3, 0.2, 0.9, 0.4]), 3)
    policy = D.Policy(model, copy.deepcopy(tiny).requires_grad_(False))
    tr = Trainer(model, opt, sched, params, max_grad_norm=cfg.max_grad_norm)
    sums, _, passes = D.learn(policy, tr, methods.METHODS[method], D.Rollouts(prompt, attn, completion, adv, cmask),
                              cfg, torch.Generator().manual_seed(0))
    return torch.cat([p.detach().flatten() for p in params]), sums, passes


@pytest.mark.parametrize("method", ["wd1", "spg", "espo"])
def test_the_update_does_not_depend_on_the_micro_batch_size(tiny, method):
    whole, sums, passes = run_updates(tiny, method, 6)
    split, _, _ = run_updates(tiny, method, 2)
    start = torch.cat([p.detach().flatten() for p in tiny.parameters()])
    assert (whole - start).abs().max() > 1e-3  # the weights moved
    torch.testing.assert_close(split, whole, atol=2e-6, rtol=0)
    # log-likelihood forward passes per completion: wd1 mu x 1; SPG mu x m; ESPO mu x 2M for current, old and ref
    assert passes == {"wd1": 2, "spg": 4, "espo": 24}[method]
    assert all(math.isfinite(v) for v in sums.values())


def test_espo_first_update_has_ratio_one_and_zero_kl(tiny, monkeypatch):
    seen = []
    real = methods.espo_loss
    monkeypatch.setitem(methods.METHODS, "espo", methods.METHODS["espo"].__class__(
        **{**methods.METHODS["espo"].__dict__,
           "loss": lambda est, old, ref, adv, cmask, cfg: seen.append((est.detach(), old, ref)) or
           real(est, old, ref, adv, cmask, cfg)}))
    run_updates(tiny, "espo", 6)
    (e0, old0, ref0), (e1, old1, _) = seen
    torch.testing.assert_close(e0, old0, atol=1e-4, rtol=0)  # rho = exp((ELBO - old) / L) = 1
    torch.testing.assert_close(e0, ref0, atol=1e-4, rtol=0)  # the reference is the starting model
    assert (e1 - old1).abs().max() > 1e-3


def test_two_gloo_ranks_give_the_update_of_one_process_for_every_method():
    out = launch("tests/methods_two_ranks.py", [], nproc=2)
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.stdout.splitlines()}
    assert set(rows) == {"d1", "wd1", "spg", "espo"}, out.stdout
    for name, (diff, moved) in rows.items():
        assert moved > 1e-3 and diff < 1e-6, (name, diff, moved)


# --- the command line --------------------------------------------------------------------------------------------


def test_each_method_gets_its_authors_values_and_refuses_flags_it_does_not_use(capsys):
    c = {m: methods.get_args(["--model", TINY, "--method", m]) for m in ("d1", "wd1", "spg", "espo")}
    assert c["d1"].beta == 0.04 and c["d1"].epsilon == 0.5  # d1 is untouched
    assert c["wd1"].beta == 0 and c["spg"].beta == 0 and c["spg"].spg_beta == 1.0  # Sudoku: SPG's beta_EUBO 1.0
    assert (c["espo"].epsilon, c["espo"].beta) == (0.2, 1e-2)
    assert methods.get_args(["--model", TINY, "--method", "espo", "--task", "countdown"]).beta == 3e-3
    for argv in (["--method", "wd1", "--beta", "0.1"], ["--method", "spg", "--epsilon", "0.3"],
                 ["--method", "espo", "--p-mask-prompt", "0.1"], ["--spg-mode", "eubo"],
                 ["--method", "spg", "--espo-mc", "4"], ["--method", "spg", "--spg-beta", "0.5"]):
        with pytest.raises(SystemExit):
            methods.get_args(["--model", TINY] + argv)
        assert "--method" in capsys.readouterr().err or "--spg-beta" in argv
