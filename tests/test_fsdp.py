"""--fsdp (parallel.py): FSDP2 on 2 gloo ranks trains what 1 process (SFT) or 2 DDP ranks (diffu-GRPO, methods.py)
train, for full fine-tuning and LoRA, with gradient checkpointing; its checkpoints reshard (halted on 2 ranks and
resumed on 1, and the reverse); a kill -9 mid-checkpoint then --resume ends bit-identical; the export of a sharded run
is the usual one. Equal means to float rounding: the ranks reduce gradients in another order than one process sums
them (and DDP all-reduces where FSDP2 reduce-scatters), so weights agree to ~1e-6, not bit for bit."""
import json

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

import common
import diffu_grpo as D
import harness
import sft
import weights as W
from conftest import TINY, launch
from fsdp_settings import RL, SFT
from test_runs import assert_same_bits, cli, ok


def close(a, b, tol=2e-5):
    """The largest difference between two exports' weights, asserted below tol, and how far the first moved from
    its random start (a comparison of two runs that learned nothing would prove nothing)."""
    wa, wb = W.load_model(str(a)).state_dict(), W.load_model(str(b)).state_dict()
    start = W.build(TINY, seed=0)[0].state_dict()
    assert wa.keys() == wb.keys()
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    start.update({k: torch.zeros_like(v) for k, v in wa.items() if "lora_B" in k})  # LoRA's B starts at 0
    moved = max((wa[k].float() - start[k].float()).abs().max().item() for k in start)
    assert diff < tol and moved > 1e-3, (a, b, diff, moved)


def test_fsdp_on_two_ranks_trains_what_one_process_and_ddp_train_and_its_checkpoints_reshard(tmp_path):
    for name, argv in [("sft_full_one", SFT), ("sft_lora_one", SFT + ["--lora-r", "4"])]:
        sft.main(argv + ["--out-dir", str(tmp_path / name)])
    sft.main(SFT + ["--fsdp", "--halt-after", "3", "--out-dir", str(tmp_path / "sft_1to2")])  # resumed on 2 ranks
    out = launch("tests/fsdp_two_ranks.py", [str(tmp_path)], nproc=2)
    assert out.stdout.count("done") == 2, out.stdout[-2000:] + out.stderr[-2000:]
    sft.main(SFT + ["--fsdp", "--resume", "--out-dir", str(tmp_path / "sft_2to1")])  # halted on 2 ranks

    # SFT: FSDP2 on 2 ranks (gradient checkpointing on) = 1 process, full fine-tuning and LoRA; the sharded
    # validation loss before any step = 1 process's.
    close(tmp_path / "sft_full_one/final", tmp_path / "sft_full_fsdp/final")
    close(tmp_path / "sft_lora_one/final", tmp_path / "sft_lora_fsdp/final")
    first = lambda d: json.loads(open(tmp_path / d / "metrics.jsonl").readline())["eval_loss"]
    assert abs(first("sft_full_one") - first("sft_full_fsdp")) < 1e-6 * first("sft_full_one")
    # Resharding: halted on 2 ranks, resumed on 1, and the reverse, end where the uninterrupted run ends.
    close(tmp_path / "sft_full_one/final", tmp_path / "sft_2to1/final")
    close(tmp_path / "sft_full_one/final", tmp_path / "sft_1to2/final")
    # diffu-GRPO and the methods: FSDP2 = DDP on 2 ranks (full fine-tuning with a sharded reference policy, LoRA).
    for name in ("rl_full", "rl_lora", "spg", "espo"):
        close(tmp_path / f"{name}_ddp/final", tmp_path / f"{name}_fsdp/final")

    # RL's rollouts depend on the rank count, so a run halted on 2 ranks is checked at the halt: a 1-process load of
    # its sharded checkpoint holds exactly the weights and AdamW state the 2 ranks held.
    saved = torch.load(tmp_path / "rl_halt_state.pt", weights_only=False)
    cfg = D.get_config(RL + ["--lora-r", "0", "--beta", "0.04", "--fsdp"])[0]
    model = W.build(TINY, seed=cfg.seed)[0]
    params = list(model.parameters())
    tr = common.make_trainer(model, params, cfg, cfg.max_steps)
    meta, _ = harness.load_checkpoint(str(tmp_path / "rl_halt/checkpoint"), tr)
    assert meta["step"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved["model"][k]), k
    optim = get_optimizer_state_dict(model, tr.opt, options=StateDictOptions(full_state_dict=True))
    assert optim["state"].keys() == saved["optim"]["state"].keys()
    for k, st in optim["state"].items():
        for name, v in st.items():
            assert torch.equal(v, saved["optim"]["state"][k][name]), (k, name)
    assert tr.sched.last_epoch == 2


def test_kill_9_of_a_two_rank_fsdp_run_mid_checkpoint_then_resume_is_bit_identical(tmp_path):
    args = SFT + ["--fsdp", "--save-every", "2"]
    straight = cli("sft.py", args + ["--out-dir", str(tmp_path / "straight")], nproc=2, wait=False)
    # Rank 0 is killed with every rank's shards of the 2nd checkpoint written to checkpoint.tmp, before the rename.
    killed = cli("sft.py", args + ["--out-dir", str(tmp_path / "k")], nproc=2, env={"D1_CRASH_AT": "write:2"},
                 wait=False)
    for p in (straight, killed):
        p.communicate(timeout=600)
    assert straight.returncode == 0 and killed.returncode != 0
    assert json.load(open(tmp_path / "k/checkpoint/meta.json"))["step"] == 2  # the 1st checkpoint, intact
    ok(cli("sft.py", args + ["--out-dir", str(tmp_path / "k"), "--resume"], nproc=2))
    assert_same_bits(tmp_path / "straight/final", tmp_path / "k/final")
