"""lmeval.py: LLaDA's likelihood estimate and greedy check against hand computations (no harness needed), and the
model registered as `llada` in lm-evaluation-harness: generation equal to the sampler's, a generation task and a
multiple-choice task defined on local files run end to end on a tiny export, and (opt-in, D1_OPTIN=1) on two gloo
ranks as on one. The harness tests skip when lm_eval is not installed (CI installs it)."""
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

import lmeval
from conftest import ROOT, launch, llada_only
from harness import export_model
from sample import decode_completions, generate, pad_left


def toy(tiny, seed=0, P=5, L=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 90, (P,), generator=g), torch.randint(10, 90, (L,), generator=g)


def test_masks_spread_the_masked_counts_over_1_to_L_at_random_positions():
    g = torch.Generator().manual_seed(0)
    m = lmeval.draw_masks(6, 6, g)
    assert sorted(m.sum(1).tolist()) == [1, 2, 3, 4, 5, 6]  # n = L samples: every count once
    m = lmeval.draw_masks(8, 4, g)
    counts = m.sum(1)
    assert ((counts >= 1) & (counts <= 8)).all() and len(set(counts.tolist())) == 4
    assert not torch.equal(lmeval.draw_masks(8, 4, g), lmeval.draw_masks(8, 4, g))  # positions are drawn


def test_the_estimate_equals_a_hand_computation_with_fixed_masks(tiny):
    prefix, target = toy(tiny)
    mask_id, L = tiny.cfg.mask_token_id, len(target)
    masks = torch.tensor([[1, 0, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    want = []
    for row in masks:
        x = torch.cat([prefix, torch.where(row, torch.tensor(mask_id), target)])[None]
        logp = F.log_softmax(tiny(x)[0, len(prefix):].float(), -1)
        nll = -sum(logp[k, target[k]] for k in range(L) if row[k])
        want.append(nll * L / int(row.sum()))
    got = lmeval.masked_nll(tiny, prefix, target, masks, mask_id)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    one = target[:1]  # one token: its only mask is exact, so one sample whatever mc_num
    exact = F.log_softmax(tiny(torch.cat([prefix, torch.tensor([mask_id])])[None])[0, -1].float(), -1)[one[0]]
    assert lmeval.loglikelihood_of(tiny, prefix, one, mask_id, mc_num=64, batch_size=8) == pytest.approx(
        exact.item(), abs=1e-5)


def greedy_by_hand(model, prefix, L, mask_id):
    """Unmask L tokens one at a time, the most confident masked position first: a plain transcription."""
    x = torch.cat([prefix, torch.full((L,), mask_id)])
    for _ in range(L):
        p = model(x[None])[0].float().softmax(-1)
        best, where, what = -1.0, None, None
        for i in range(len(prefix), len(x)):
            if x[i] == mask_id and p[i].max() > best:
                best, where, what = p[i].max().item(), i, p[i].argmax()
        x[where] = what
    return x[len(prefix):]


def test_the_greedy_flag_is_true_on_the_greedy_continuation_and_false_off_it(tiny):
    prefix, _ = toy(tiny)
    mask_id = tiny.cfg.mask_token_id
    greedy = greedy_by_hand(tiny, prefix, 4, mask_id)
    assert lmeval.is_greedy(tiny, prefix, greedy, mask_id)
    other = greedy.clone()
    other[2] = (other[2] + 1) % 90 + 10
    assert not lmeval.is_greedy(tiny, prefix, other, mask_id)


def test_request_generators_depend_on_the_text_not_the_order():
    a = lmeval.request_generator(7, "ctx", "cont")
    b = lmeval.request_generator(7, "ctx", "cont")
    c = lmeval.request_generator(7, "ctx", "other")
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    assert not torch.equal(torch.rand(3, generator=lmeval.request_generator(7, "ctx", "cont")),
                           torch.rand(3, generator=c))
    assert lmeval.cut_at_stops("abc\n\nQ: next", ["\n\n", "Q:"]) == "abc"


# --- in the harness ----------------------------------------------------------------------------------------------


@pytest.fixture
def export(tmp_path, tiny, tok):
    export_model(str(tmp_path / "final"), tiny, tok)
    return str(tmp_path / "final")


def request(*args):
    return types.SimpleNamespace(args=args)


@llada_only
def test_generate_until_gives_the_samplers_completions_cut_at_the_stops(export, tok):
    pytest.importorskip("lm_eval")
    lm = lmeval.LLaDAEvalModel(pretrained=export, gen_length=16, block_length=8, steps=8, temperature=0.7,
                               batch_size=3)
    contexts = ["sudoku 1030020040000301", "2+2=", "hi"]
    got = lm.generate_until([request(c, {"until": ["3"]}) for c in contexts])
    ids, mask = pad_left([tok(c, add_special_tokens=False)["input_ids"] for c in contexts], tok.pad_token_id)
    out = generate(lm.model, ids, mask, gen_length=16, block_length=8, steps=8, temperature=0.7,
                   generator=lmeval.request_generator(lm.seed, contexts[0]))
    want = [t.split("3")[0] for t in decode_completions(tok, out.completion, lm.model.cfg.eos_token_id)]
    assert got == want
    with pytest.raises(NotImplementedError, match="masked diffusion"):
        lm.loglikelihood_rolling([request("text")])


def write_tasks(folder):
    """A generation task and a multiple-choice task on local files (no hub)."""
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    mc = [{"question": f"Which is {w}?", "choices": ["red", "blue", "green"], "label": i % 3}
          for i, w in enumerate(["red", "blue", "green", "blue"])]
    for name, data in (("gen", rows), ("mc", mc)):
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    common = "dataset_path: json\ntest_split: test\n"
    with open(os.path.join(folder, "tiny_gen.yaml"), "w") as f:
        f.write(f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder}/gen.jsonl\n"
                "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
                "generation_kwargs:\n  until: ['\\n']\nmetric_list:\n  - metric: exact_match\n")
    with open(os.path.join(folder, "tiny_mc.yaml"), "w") as f:
        f.write(f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder}/mc.jsonl\n"
                "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")


MODEL_ARGS = "gen_length=16,block_length=8,steps=8,mc_num=4"


def test_local_generation_and_multiple_choice_tasks_run_on_a_tiny_export(export, tmp_path):
    """In the harness: the multiple-choice accuracy is the argmax of this model's estimates over each question's
    choices, and an estimate is loglikelihood_of's."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    write_tasks(str(tmp_path))
    lm = lmeval.LLaDAEvalModel(pretrained=export, gen_length=16, block_length=8, steps=8, mc_num=4, batch_size=4)
    seen = []
    real = lm.loglikelihood
    lm.loglikelihood = lambda reqs, **kw: seen.extend(zip([r.args for r in reqs], real(reqs))) or [s for _, s in
                                                                                                  seen[-len(reqs):]]
    one = simple_evaluate(model=lm, tasks=["tiny_gen", "tiny_mc"],
                          task_manager=TaskManager(include_path=str(tmp_path)))["results"]
    assert 0 <= one["tiny_gen"]["exact_match,none"] <= 1
    by_question = {}
    for (context, continuation), (ll, _) in seen:
        by_question.setdefault(context, []).append((ll, continuation.strip()))
    docs = [json.loads(line) for line in open(tmp_path / "mc.jsonl")]
    acc = sum(max(by_question[next(c for c in by_question if d["question"] in c)])[1] == d["choices"][d["label"]]
              for d in docs) / len(docs)
    assert one["tiny_mc"]["acc,none"] == pytest.approx(acc)
    (context, continuation), (ll, _) = seen[0]
    pre, whole = lm.ids(context), lm.ids(context + continuation)
    g = lmeval.request_generator(lm.seed, context, continuation)
    assert ll == pytest.approx(lmeval.loglikelihood_of(lm.model, torch.tensor(whole[:len(pre)]),
                                                       torch.tensor(whole[len(pre):]), lm.mask_id, 4, 4, g))


@pytest.mark.optin
def test_two_gloo_ranks_give_the_numbers_of_one_process(export, tmp_path):
    """`lmeval.py` under torchrun, 2 gloo ranks (the harness shards the requests), against one process."""
    pytest.importorskip("lm_eval")
    write_tasks(str(tmp_path))
    results = {}
    for n in (1, 2):
        launch(os.path.join(ROOT, "lmeval.py"), ["--model", "llada", "--model_args",
                                                 f"pretrained={export},{MODEL_ARGS}", "--tasks", "tiny_mc",
                                                 "tiny_gen", "--include_path", str(tmp_path), "--batch_size", "4",
                                                 "--output_path", str(tmp_path / f"out{n}")], nproc=n)
        path = next(os.path.join(r, f) for r, _, fs in os.walk(tmp_path / f"out{n}") for f in fs
                    if f.startswith("results"))
        results[n] = json.load(open(path))["results"]
    one, two = results[1], results[2]
    for task in ("tiny_mc", "tiny_gen"):
        assert {k: v for k, v in two[task].items() if "stderr" not in k and k != "alias"} == \
            {k: v for k, v in one[task].items() if "stderr" not in k and k != "alias"}


def test_without_the_harness_lmeval_py_says_how_to_install_it_in_one_line():
    import subprocess
    import sys
    code = ("import sys, runpy; sys.modules['lm_eval'] = None; sys.argv = ['lmeval.py', '--tasks', 'gsm8k']; "
            "runpy.run_path('lmeval.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == lmeval.INSTALL
