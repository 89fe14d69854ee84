import json

import pytest
import torch
import torch.nn.functional as F

import common
import model as M
import weights as W
import sft
from conftest import TINY, launch, llada_only
from data import sft_split

TINY_SFT = ["--model", TINY, "--task", "sudoku", "--prompt-style", "compact", "--max-length", "80",
            "--train-n", "64", "--eval-n", "16", "--batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-3",
            "--warmup-steps", "2", "--objective", "sft", "--eps", "0.001", "--no-keep-best", "--blanks", "6", "10",
            "--eval-every", "0"]  # the tiny preset's objective, eps, keep-best and blanks replaced: a plain SFT run


def load_split(argv):
    """sft.py's (training rows, validation rows) for a command line."""
    c = sft.get_args(argv)
    return sft_split(c.task, c.data_path, c.prompt_style, c.train_n, c.eval_n, c.eval_frac, c.seed, c.blanks,
                     c.sudoku_answers)


def test_loss_equals_a_hand_computation_prompt_never_masked_eos_padding_counted(tiny):
    mask_id, eos = tiny.cfg.mask_token_id, tiny.cfg.eos_token_id
    ids = torch.tensor([[10, 11, 12, 20, 21, eos, eos, eos],
                        [10, 11, 12, 13, 14, 30, eos, eos]])
    plens = torch.tensor([3, 5])
    t = torch.tensor([0.5, 0.25])
    u = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    u[:, 0] = 0.0  # would be masked if prompts were maskable
    u[0, 7] = 0.0  # an EOS padding position: must be masked
    got = sft.sft_loss(tiny, ids, plens, mask_id, t, u, eps=1e-3)
    want = 0.0
    for b in range(2):
        p = (1 - 1e-3) * t[b].item() + 1e-3
        noisy = ids[b].clone()
        masked = [i for i in range(8) if i >= plens[b] and u[b, i] < p]
        assert 7 in masked or b == 1
        for i in masked:
            noisy[i] = mask_id
        logp = F.log_softmax(tiny(noisy[None])[0], -1)
        total = sum(-logp[i, ids[b, i]].item() / p for i in masked)
        want += total / (8 - plens[b].item())  # answer length includes the EOS padding
    torch.testing.assert_close(got.item(), want / 2, rtol=1e-5, atol=1e-6)


def test_loss_norm_batch_is_d1s_sum_over_all_answer_tokens_and_equals_ours_at_batch_one(tiny):
    # d1's sft_train.py: sum over the batch of CE / p on masked answer tokens, divided by the batch's answer tokens.
    mask_id, eos = tiny.cfg.mask_token_id, tiny.cfg.eos_token_id
    ids = torch.tensor([[10, 11, 12, 20, 21, eos, eos, eos],
                        [10, 11, 12, 13, 14, 15, 30, eos]])
    plens, t = torch.tensor([2, 6]), torch.tensor([0.6, 0.9])  # answer lengths 6 and 2
    u = torch.rand(2, 8, generator=torch.Generator().manual_seed(2))
    sums = []  # answer lengths: 6 and 2
    for b in range(2):  # each sequence's sum of CE / p by hand
        p = (1 - 1e-3) * t[b].item() + 1e-3
        masked = [i for i in range(8) if i >= plens[b] and u[b, i] < p]
        noisy = ids[b].clone()
        noisy[masked] = mask_id
        logp = F.log_softmax(tiny(noisy[None])[0], -1)
        sums.append(sum(-logp[i, ids[b, i]].item() / p for i in masked))
    assert all(sums)
    got = sft.sft_loss(tiny, ids, plens, mask_id, t, u, norm="batch").item()
    assert got == pytest.approx((sums[0] + sums[1]) / 8, rel=1e-5)
    ours = sft.sft_loss(tiny, ids, plens, mask_id, t, u).item()
    assert ours == pytest.approx((sums[0] / 6 + sums[1] / 2) / 2, rel=1e-5) and abs(ours - got) > 1e-3
    one = [sft.sft_loss(tiny, ids[:1], plens[:1], mask_id, t[:1], u[:1], norm=n).item() for n in ("sequence", "batch")]
    assert one[0] == pytest.approx(one[1], rel=1e-6)


@llada_only  # LLaDA's end of turn
def test_tokenize_examples_pads_with_eos_and_counts_truncation(tok):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": "abc"},
            {"prompt": [{"role": "user", "content": "hi"}], "completion": "x" * 100}]
    ids, plens, n_trunc = sft.tokenize_examples(tok, rows, 64, tok.eos_token_id)
    assert ids.shape == (2, 64) and n_trunc == 1
    p = plens[0].item()
    assert tok.decode(ids[0, p:p + 4]) == "abc<|eot_id|>"
    assert (ids[0, p + 4:] == tok.eos_token_id).all()


def read_weights(path):
    return W.load_model(path).state_dict()


def run(args, nproc=1):
    out = launch("sft.py", args, nproc)
    return out.stdout + out.stderr


def test_two_process_gloo_run_equals_one_process_run_and_ranks_agree(tmp_path):
    common = TINY_SFT + ["--max-steps", "3"]
    run(common + ["--out-dir", str(tmp_path / "one")])
    log = run(common + ["--out-dir", str(tmp_path / "two")], nproc=2)
    assert "ranks in sync: True" in log
    a, b = read_weights(str(tmp_path / "one" / "final")), read_weights(str(tmp_path / "two" / "final"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    # The held-out loss is sharded over the ranks; before any step (same weights) it equals the one-rank number.
    first = lambda d: json.loads(open(tmp_path / d / "metrics.jsonl").readline())
    assert first("one")["step"] == first("two")["step"] == 0
    assert abs(first("one")["eval_loss"] - first("two")["eval_loss"]) < 1e-6 * first("one")["eval_loss"]
    assert "forward tokens per evaluation, sharded over 2 rank(s)" in log


def test_resume_continues_exactly(tmp_path):
    steps = TINY_SFT + ["--max-steps", "6", "--save-every", "3"]
    run(steps + ["--out-dir", str(tmp_path / "straight")])
    run(steps + ["--out-dir", str(tmp_path / "halted"), "--halt-after", "3"])
    assert not (tmp_path / "halted" / "final").exists()
    meta = json.load(open(tmp_path / "halted" / "checkpoint" / "meta.json"))
    assert meta["step"] == 3
    run(steps + ["--out-dir", str(tmp_path / "halted"), "--resume"])
    a, b = read_weights(str(tmp_path / "straight" / "final")), read_weights(str(tmp_path / "halted" / "final"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lora_sft_exports_the_exact_adapter_by_default_and_an_fp32_merge_on_request(tmp_path):
    run(TINY_SFT + ["--max-steps", "2", "--lora-r", "4", "--lora-alpha", "8", "--out-dir", str(tmp_path / "l")])
    exact = W.load_model(str(tmp_path / "l" / "final"))
    assert M.has_lora(exact) and (tmp_path / "l" / "final" / W.ADAPTER_FILE).exists()
    run(TINY_SFT + ["--max-steps", "2", "--lora-r", "4", "--lora-alpha", "8", "--export", "merged",
                    "--out-dir", str(tmp_path / "m")])
    merged = W.load_model(str(tmp_path / "m" / "final"))
    assert not M.has_lora(merged) and not (tmp_path / "m" / "final" / W.ADAPTER_FILE).exists()
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merged(ids), exact(ids), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_short_tiny_sudoku_run_lowers_the_heldout_loss_substantially(tmp_path):
    metrics = sft.main(["--model", TINY, "--task", "sudoku", "--prompt-style", "compact", "--max-length", "80",
                        "--train-n", "2000", "--eval-n", "32", "--batch-size", "16", "--micro-batch-size", "16",
                        "--lr", "2e-3", "--warmup-steps", "5", "--max-steps", "80", "--eval-every", "0",
                        "--objective", "sft", "--eps", "0.001", "--no-keep-best", "--blanks", "6", "10",
                        "--out-dir", str(tmp_path), "--no-export"])
    first = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert first["step"] == 0
    assert metrics["eval_loss"] < 0.5 * first["eval_loss"], (first, metrics)


def test_batches_stream_through_seeded_epochs_for_any_set_size():
    # Set size a multiple of the batch: batch k of epoch e is slice k of epoch e's permutation.
    perm = lambda e, n: torch.randperm(n, generator=torch.Generator().manual_seed(7 + e))
    for step in range(6):
        e, k = divmod(step, 2)
        assert torch.equal(common.batch_for(step, 32, 64, 7), perm(e, 64)[k * 32:(k + 1) * 32])
    # Any size: the batches, concatenated, are the epochs' permutations concatenated (a set smaller than a batch
    # included), so every example is seen equally often.
    for n, b in [(16, 32), (10, 4), (5, 3)]:
        stream = torch.cat([common.batch_for(s, b, n, 7) for s in range(12)])
        want = torch.cat([perm(e, n) for e in range(len(stream) // n + 1)])[:len(stream)]
        assert torch.equal(stream, want), (n, b)


def test_early_stopping_stops_after_patience_and_exports_the_best_steps_weights(tmp_path, monkeypatch):
    # A scripted held-out loss (the real one is a function of the weights): best at step 10, then 2 worse ones.
    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.2, 1.0, 1.0])
    monkeypatch.setattr(sft, "heldout_loss", lambda *a, **k: next(scripted))
    common = TINY_SFT[:-2] + ["--lr-schedule", "constant"]
    m = sft.main(common + ["--eval-every", "5", "--max-steps", "40", "--patience", "2",
                           "--out-dir", str(tmp_path / "early")])
    assert m["best_step"] == 10 and m["best_eval_loss"] == 3.0
    steps = [json.loads(line)["step"] for line in open(tmp_path / "early" / "metrics.jsonl")]
    assert steps[-1] == 20  # evaluations at 15 and 20 did not beat step 10's: stop there
    monkeypatch.setattr(sft, "heldout_loss", lambda *a, **k: 0.0)
    sft.main(common + ["--eval-every", "0", "--max-steps", "10", "--out-dir", str(tmp_path / "ten")])
    a, b = read_weights(str(tmp_path / "early" / "final")), read_weights(str(tmp_path / "ten" / "final"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_early_stopping_survives_a_resume(tmp_path, monkeypatch):
    # Halted at step 15 (after the best, step 10), resumed: the best weights come back from the checkpoint.
    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.2])
    monkeypatch.setattr(sft, "heldout_loss", lambda *a, **k: next(scripted))
    args = TINY_SFT[:-2] + ["--lr-schedule", "constant", "--eval-every", "5", "--max-steps", "40", "--patience", "2",
                            "--save-every", "5", "--out-dir", str(tmp_path / "r")]
    sft.main(args + ["--halt-after", "15"])
    assert not (tmp_path / "r" / "final").exists()
    m = sft.main(args + ["--resume"])
    assert m["best_step"] == 10
    monkeypatch.setattr(sft, "heldout_loss", lambda *a, **k: 0.0)
    sft.main(TINY_SFT[:-2] + ["--lr-schedule", "constant", "--eval-every", "0", "--max-steps", "10",
                              "--out-dir", str(tmp_path / "ten")])
    a, b = read_weights(str(tmp_path / "r" / "final")), read_weights(str(tmp_path / "ten" / "final"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sudoku_validation_puzzles_avoid_test_grids_and_labelled_grids():
    # The held-out loss picks the model (--patience), so it must never see a test grid; and a grid the labelled set
    # uses would flatter it. Large labelled sets use every training grid: then only the puzzles themselves differ.
    from data.sudoku import split_grids
    train_grids, test_grids = split_grids()
    rows, held = load_split(TINY_SFT)
    assert len(held) == 16 and not set(held["solution"]) & set(test_grids)
    assert set(held["solution"]) <= set(train_grids) and not set(held["solution"]) & set(rows["solution"])
    rows, held = load_split(TINY_SFT + ["--train-n", "5000"])
    assert len(set(rows["solution"])) == len(train_grids) and len(held) == 16
    assert not set(held["puzzle"]) & set(rows["puzzle"]) and not set(held["solution"]) & set(test_grids)


def test_pretraining_objective_masks_the_prompt_too_and_normalises_by_the_whole_length(tiny):
    # LLaDA's pre-training objective (its paper's Eq. 3): every token maskable, sum of CE / p over masked positions, divided
    # by the sequence length. sft_loss gives it when the maskable part starts at 0.
    mask_id, eos = tiny.cfg.mask_token_id, tiny.cfg.eos_token_id
    ids = torch.tensor([[10, 11, 12, 20, 21, eos, eos, eos]])
    t, eps = torch.tensor([0.4]), 1e-3
    u = torch.rand(1, 8, generator=torch.Generator().manual_seed(1))
    u[0, 0] = 0.0  # a prompt position: masked under pre-training
    got = sft.sft_loss(tiny, ids, torch.tensor([0]), mask_id, t, u, eps=eps)
    p = (1 - eps) * 0.4 + eps
    masked = [i for i in range(8) if u[0, i] < p]
    assert 0 in masked
    noisy = ids[0].clone()
    noisy[masked] = mask_id
    logp = F.log_softmax(tiny(noisy[None])[0], -1)
    want = sum(-logp[i, ids[0, i]].item() / p for i in masked) / 8
    torch.testing.assert_close(got.item(), want, rtol=1e-5, atol=1e-6)


def test_objective_mix_gives_each_sequence_one_of_llada_s_two_objectives():
    plens = torch.tensor([5, 6, 7, 8])
    coin = torch.tensor([0.1, 0.9, 0.4, 0.6])
    assert sft.maskable_start(plens, coin, "sft").tolist() == [5, 6, 7, 8]
    assert sft.maskable_start(plens, coin, "pretrain").tolist() == [0, 0, 0, 0]
    assert sft.maskable_start(plens, coin, "mix").tolist() == [0, 6, 0, 8]
    # the coins come from the step's seeded noise: about half of a large batch each way, the same on every call
    _, _, c = sft.noise_for(3, 0, 4000, 8)
    assert 0.45 < (c < 0.5).float().mean().item() < 0.55
    assert torch.equal(c, sft.noise_for(3, 0, 4000, 8)[2])


def test_random_fill_answers_keep_the_givens_and_say_nothing_of_the_solution():
    rows, held = load_split(TINY_SFT + ["--train-n", "400", "--sudoku-answers", "random"])
    right = blanks = 0
    for r in list(rows) + list(held):
        grid = r["completion"][len("<answer>"):-len("</answer>")]
        assert r["completion"] == f"<answer>{grid}</answer>" and len(grid) == 16 and set(grid) <= set("1234")
        for g, p, s in zip(grid, r["puzzle"], r["solution"]):
            if p != "0":
                assert g == p  # the given cells are copied
            else:
                blanks, right = blanks + 1, right + (g == s)
    assert 0.2 < right / blanks < 0.3  # blanks are right by chance only (1 in 4)

def test_sudoku_answers_random_on_another_task_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        sft.get_args(["--model", TINY, "--task", "countdown", "--sudoku-answers", "random"])
    assert e.value.code == 2 and "--sudoku-answers random is for --task sudoku" in capsys.readouterr().err


def test_time_budget_ends_the_run_after_the_step_that_spends_it_and_a_resume_counts_the_earlier_time(tmp_path):
    """--time-budget (the arena's equal-time comparisons): the run stops after the first step at which it has
    trained that long and exports as a finished run would; a resumed run counts the time it had spent."""
    out = str(tmp_path / "b")
    run(TINY_SFT + ["--max-steps", "40", "--time-budget", "1e-9", "--out-dir", out])
    meta = json.load(open(tmp_path / "b" / "final" / "meta.json"))
    assert meta["last_step"] == 1 and meta["train_seconds"] > 0
    out = str(tmp_path / "h")
    run(TINY_SFT + ["--max-steps", "40", "--halt-after", "2", "--out-dir", out])
    before = json.load(open(tmp_path / "h" / "checkpoint" / "meta.json"))["train_seconds"]
    run(TINY_SFT + ["--max-steps", "40", "--time-budget", "1e-9", "--resume", "--out-dir", out])
    meta = json.load(open(tmp_path / "h" / "final" / "meta.json"))
    assert meta["last_step"] == 3 and meta["train_seconds"] > before > 0
