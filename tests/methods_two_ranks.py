"""Run by tests/test_methods.py under torchrun (2 gloo ranks): the inner updates of one rollout batch for each method,
split over the two ranks (one group each, world 2) and, on rank 0, on the whole batch in one process (world 1), from
the same weights with the same masks. Prints 'METHOD difference moved' per method: the largest weight difference between the two, and how far
the weights moved."""
import copy
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402
from common import Trainer  # noqa: E402
import diffu_grpo as D  # noqa: E402
import methods  # noqa: E402
import model as M  # noqa: E402
import parallel  # noqa: E402
from conftest import TINY, ARCH  # noqa: E402

rank, _, world, _ = common.compute_init("cpu")
tok = M.tiny_tokenizer(ARCH)
base = M.LLaDA(M.tiny_config(tok, arch=ARCH)).init_weights(torch.Generator().manual_seed(0))
g = torch.Generator().manual_seed(1)
G, N, P, L, mu = 3, 6, 7, 16, 2
prompt = torch.randint(3, 100, (N, P), generator=g)
attn = torch.ones(N, P, dtype=torch.long)
attn[1, :2] = attn[4, :3] = 0
completion = torch.randint(3, 100, (N, L), generator=g)
cmask = torch.ones(N, L)  # equal token counts on both ranks: every method's normaliser is then equal too
adv = D.group_advantages(torch.rand(N, generator=g), G)


def updates(cfg, name, masks, rows, w):
    """mu updates on rows `rows` of the batch in a world of w ranks; returns the trained weights (flat)."""
    model = copy.deepcopy(base)
    params = parallel.distribute(model, False, w, torch.device("cpu"))  # w > 1: DDP averages the gradients
    opt = torch.optim.SGD(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    policy = D.Policy(model, copy.deepcopy(base).eval().requires_grad_(False))
    tr = Trainer(model, opt, sched, params, w, cfg.max_grad_norm)
    b = D.Rollouts(prompt[rows], attn[rows], completion[rows], adv[rows], cmask[rows])
    obj = dataclasses.replace(methods.METHODS[name], draw=lambda *a: {k: v[:, rows] for k, v in masks.items()})
    D.learn(policy, tr, obj, b, cfg, None)
    return torch.cat([p.detach().flatten() for p in params])


for name in ("d1", "wd1", "spg", "espo"):
    cfg = methods.get_args(["--model", TINY, "--method", name, "--gen-length", str(L), "--block-length", "8", "--steps",
                      "2", "--num-generations", str(G), "--num-iterations", str(mu), "--micro-batch-size", "3"])
    gen = torch.Generator().manual_seed(2)  # the same masks on both ranks: drawn for the whole batch
    masks = methods.METHODS[name].draw(gen, mu, attn, cmask, cfg)
    split = updates(cfg, name, masks, slice(rank * N // 2, (rank + 1) * N // 2), world)
    if rank == 0:
        whole = updates(cfg, name, masks, slice(0, N), 1)
        moved = (whole - torch.cat([p.detach().flatten() for p in base.parameters()])).abs().max().item()
        print(name, (split - whole).abs().max().item(), moved, flush=True)  # the difference, and how far it moved
common.compute_cleanup()
