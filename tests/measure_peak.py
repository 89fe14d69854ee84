"""Measured peak memory of one diffu-GRPO update micro-batch on the CPU, for tests/test_memory.py.

Run as a subprocess with MALLOC_MMAP_THRESHOLD_ set (so freed tensors go back to the OS at once and the resident set
follows live memory): builds a small bf16 model, runs one update to create the optimizer state, then samples the
resident set every 0.2 ms during a second update and prints the peak above the level before it, in bytes, as JSON.
    python tests/measure_peak.py D_MODEL N_LAYERS MLP VOCAB MICRO_BATCH PROMPT COMPLETION LORA_R GRAD_CKPT DTYPE
With a last argument `fsdp`, run under torchrun: the model is sharded over the ranks with FSDP2 (parallel.py) and
each rank prints its own peak.
"""
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import diffu_grpo as D  # noqa: E402
import model as M  # noqa: E402
import parallel  # noqa: E402


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(d, layers, mlp, vocab, b, P, L, r, ckpt, dtype, fsdp=False):
    torch.set_num_threads(1)
    cfg = M.LLaDAConfig(d_model=d, n_layers=layers, n_heads=d // 64, n_kv_heads=d // 64, mlp_hidden_size=mlp,
                        vocab_size=vocab, embedding_size=vocab, mask_token_id=vocab - 1, eos_token_id=vocab - 2,
                        pad_token_id=vocab - 2)
    model = M.LLaDA(cfg).init_weights(torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    if r:
        M.apply_lora(model, r, 2 * r, 0.0, M.LORA_TARGETS)
    model.gradient_checkpointing = bool(ckpt)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if fsdp:
        _, _, world, device = common.compute_init("cpu")
        params = parallel.distribute(model, True, world, device)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    prompt, comp = torch.randint(0, vocab - 2, (b, P), generator=g), torch.randint(0, vocab - 2, (b, L), generator=g)
    attn = torch.ones(b, P, dtype=torch.long)
    attn[0, :3] = 0  # left padding: the masked attention path
    pattern = torch.zeros(b, P, dtype=torch.bool)

    def step():
        logp = D.per_token_logps(model, prompt, attn, comp, pattern, cfg.mask_token_id)
        loss, _ = D.grpo_token_loss(logp, logp.detach(), None, torch.ones(b), torch.ones(b, L), 0.5, 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    base, peak, done = rss(), [0], [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)

    t = threading.Thread(target=sample)
    t.start()
    step()
    done[0] = True
    t.join()
    print(json.dumps({"peak_above_base": peak[0] - base, "base": base}))


if __name__ == "__main__":
    main(*[int(x) for x in sys.argv[1:10]], sys.argv[10], sys.argv[11:] == ["fsdp"])
