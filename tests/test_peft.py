"""PEFT's LoRA format both ways, without PEFT: folders are written by hand from the format's facts
(adapter_config.json; adapter_model.safetensors with base_model.model.<official module path>.lora_A/B.weight; the
update (lora_alpha / r) B A, or lora_alpha / sqrt(r) with use_rslora) and checked against a hand-applied update."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffu_grpo as D
import model as M
import weights as W
from conftest import TINY, llada_only

IDS = torch.randint(0, 90, (2, 14), generator=torch.Generator().manual_seed(5))


def write_peft(path, targets=("q_proj", "v_proj"), r=4, alpha=8, base_name=TINY, **extra):
    """A PEFT LoRA folder for `base_name` (the tiny model, seed 0, or an official-format checkpoint directory), as
    PEFT's save_pretrained lays it out."""
    base, _ = W.build(base_name, seed=0)
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, mod in base.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(mod, torch.nn.Linear):
            out, inn = mod.weight.shape
            sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, inn, generator=g) * 0.1
            sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.1
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": r,
           "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": list(targets), "use_rslora": False,
           "use_dora": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
           "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, **extra}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


def hand_applied(folder):
    """The tiny base with W + s B A written into every adapted weight, PEFT's formula read from the files."""
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    sd = load_file(os.path.join(folder, "adapter_model.safetensors"))
    model = W.build(cfg["base_model_name_or_path"], seed=0)[0]
    mods = dict(model.named_modules())
    with torch.no_grad():
        for k, A in sd.items():
            if k.endswith(".lora_A.weight"):
                name = k[len("base_model.model."):-len(".lora_A.weight")]
                mods[name].weight += s * sd[k.replace("lora_A", "lora_B")] @ A
    return model


@pytest.mark.parametrize("rslora", [False, True])
@llada_only
def test_a_peft_folder_loads_with_peft_scaling(tmp_path, rslora):
    folder = write_peft(tmp_path / "a", use_rslora=rslora)
    loaded, _ = W.build(folder)  # --model PEFT_DIR: the base it names, with the adapter
    torch.testing.assert_close(loaded(IDS), hand_applied(folder)(IDS), atol=2e-5, rtol=0)
    via_adapter = W.load_lora(W.build(TINY, seed=0)[0], folder)  # --adapter PEFT_DIR
    torch.testing.assert_close(via_adapter(IDS), loaded(IDS), atol=0, rtol=0)


def test_a_peft_folder_over_an_official_format_checkpoint(tmp_path):
    from conftest import OFFICIAL_TINY_CONFIG, write_official_checkpoint
    write_official_checkpoint(str(tmp_path / "llada"), dtype=torch.float32)
    tok = M.tiny_tokenizer()
    tok.save_pretrained(str(tmp_path / "llada"))
    folder = write_peft(tmp_path / "a", targets=("q_proj", "k_proj", "up_proj"), base_name=str(tmp_path / "llada"))
    ids = IDS.clamp(max=OFFICIAL_TINY_CONFIG["vocab_size"] - 1)
    torch.testing.assert_close(W.build(folder)[0](ids), hand_applied(folder)(ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("field,value,message", [("use_dora", True, "DoRA"), ("bias", "all", "bias"),
                                                 ("modules_to_save", ["ff_out"], "modules_to_save"),
                                                 ("layers_to_transform", [0], "layers_to_transform"),
                                                 ("peft_type", "IA3", "only PEFT's LORA")])
def test_what_is_not_plain_lora_is_refused_by_name(tmp_path, field, value, message):
    folder = write_peft(tmp_path / "a", **{field: value})
    with pytest.raises(M.UsageError, match=message):
        W.build(folder)


@llada_only
def test_export_of_stacked_adapters_is_one_exact_peft_adapter(tmp_path):
    model, tok = W.build(TINY, seed=0)
    W.load_lora(model, write_peft(tmp_path / "sft", r=4, alpha=8))  # stage 1 (as PEFT saved it)
    M.apply_lora(model, 2, 4.0, targets=("q_proj", "k_proj"), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # stage 2 trained: non-zero B
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    want = model(IDS)
    W.save_peft(model, str(tmp_path / "out"), "tiny")
    cfg = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert cfg["r"] == 4 + 2 and cfg["lora_alpha"] == 6.0 and cfg["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    keys = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert "base_model.model.model.transformer.blocks.0.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.transformer.blocks.0.k_proj.lora_B.weight"].shape[1] == 6
    torch.testing.assert_close(hand_applied(str(tmp_path / "out"))(IDS), want, atol=2e-5, rtol=0)  # PEFT's formula
    torch.testing.assert_close(W.build(str(tmp_path / "out"))[0](IDS), want, atol=2e-5, rtol=0)  # and reloaded


def digits(prompts, completions, **kw):
    return [sum(ch.isdigit() for ch in c) / 10 for c in completions]


@llada_only
def test_rl_starts_from_a_peft_adapter_and_exports_one_peft_adapter_of_the_trained_policy(tmp_path, monkeypatch):
    monkeypatch.setitem(D.REWARDS, "sudoku", [(digits, 1.0)])
    folder = write_peft(tmp_path / "sft")
    policy = D.main(["--model", TINY, "--adapter", folder, "--task", "sudoku", "--max-steps", "4",
                     "--num-iterations", "2", "--prompts-per-step", "1", "--num-generations", "4", "--lora-r", "2",
                     "--lora-alpha", "4", "--sample-every", "0", "--out-dir", str(tmp_path / "rl")])
    model = policy.model.eval()
    with M.lora_disabled(model):  # the reference policy is the PEFT-adapted start
        torch.testing.assert_close(model(IDS), hand_applied(folder)(IDS), atol=2e-5, rtol=0)
    trained = model(IDS)
    exported = str(tmp_path / "rl" / "final" / "peft")
    assert json.load(open(os.path.join(exported, "adapter_config.json")))["base_model_name_or_path"] == TINY
    torch.testing.assert_close(W.build(exported)[0](IDS), trained, atol=2e-5, rtol=0)
    torch.testing.assert_close(hand_applied(exported)(IDS), trained, atol=2e-5, rtol=0)
