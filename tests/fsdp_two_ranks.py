"""Run by tests/test_fsdp.py under torchrun (2 gloo ranks), with OUT as its argument: tiny runs of sft.py with
--fsdp (OUT/NAME_fsdp; the test runs them on 1 process), and of diffu_grpo.py and methods.py with and without --fsdp
(OUT/NAME_fsdp, OUT/NAME_ddp), all in this one process group, for the test to compare their exports. Also: an SFT
run halted on 2 ranks (OUT/sft_2to1, resumed by the test on 1 process), the resume on 2 ranks of a run the test
halted on 1 (OUT/sft_1to2), and a diffu-GRPO run halted on 2 ranks whose state at the halt is saved in full
(OUT/rl_halt_state.pt) for the test to compare with what a 1-process resume loads."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_optimizer_state_dict)

import common  # noqa: E402
import diffu_grpo as D  # noqa: E402
import harness  # noqa: E402
import methods  # noqa: E402
import sft  # noqa: E402
from fsdp_settings import RL, SFT, digits_reward  # noqa: E402

OUT = sys.argv[1]
# The runs share this process group: a finished run waits for the other rank instead of ending the group.
harness.compute_cleanup = lambda *a, **k: common.barrier()
# A reward that varies within a group even for the random tiny model, so every update moves the weights.
D.REWARDS["sudoku"] = [(digits_reward, 1.0)]

for name, argv in [("sft_full", SFT + ["--grad-ckpt"]), ("sft_lora", SFT + ["--lora-r", "4"])]:
    sft.main(argv + ["--fsdp", "--out-dir", f"{OUT}/{name}_fsdp"])  # the test runs the 1-process baselines
for name, argv, main in [("rl_full", RL + ["--lora-r", "0", "--beta", "0.04", "--grad-ckpt"], D.main),
                         ("rl_lora", RL + ["--lora-r", "4"], D.main),
                         ("spg", RL + ["--lora-r", "0", "--method", "spg"], methods.main),
                         ("espo", RL + ["--lora-r", "4", "--method", "espo"], methods.main)]:
    for mode, extra in (("fsdp", ["--fsdp"]), ("ddp", [])):
        main(argv + extra + ["--out-dir", f"{OUT}/{name}_{mode}"])

sft.main(SFT + ["--fsdp", "--halt-after", "3", "--out-dir", f"{OUT}/sft_2to1"])
sft.main(SFT + ["--fsdp", "--resume", "--out-dir", f"{OUT}/sft_1to2"])

trainers = []  # the run's Trainer, to read its state at the halt
D.make_trainer = lambda *a, **k: trainers.append(common.make_trainer(*a, **k)) or trainers[-1]
D.main(RL + ["--lora-r", "0", "--beta", "0.04", "--fsdp", "--halt-after", "2", "--out-dir", f"{OUT}/rl_halt"])
tr, full = trainers[-1], StateDictOptions(full_state_dict=True, cpu_offload=True)
state = {"model": get_model_state_dict(tr.model, options=full),
         "optim": get_optimizer_state_dict(tr.model, tr.opt, options=full)}
if common.is_main():
    torch.save(state, f"{OUT}/rl_halt_state.pt")
common.barrier()
print("done", flush=True)
