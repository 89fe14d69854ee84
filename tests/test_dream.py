"""Dream-7B beside LLaDA (model.py's arch="dream"): a checkpoint in Dream's official layout (Qwen2 names, q/k/v
biases, untied head, sharded safetensors) loads key for key and gives the logits of a plain transcription of Dream's
forward, written here from its description (../shared/reference/dream.md), for a plain and a left-padded batch,
after the consumer's shift; saving writes the same layout back. The shift is the point: the unshifted logits must
NOT match."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import model as M
import weights as W

# A CPU-sized Dream: Qwen2's names; rope_theta is not the config class's default (always read from the file).
CONFIG = {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 120,
          "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
          "rope_scaling": None, "tie_word_embeddings": False, "attention_dropout": 0.0, "mask_token_id": 119,
          "pad_token_id": 118, "bos_token_id": 117, "eos_token_id": 118, "use_sliding_window": False,
          "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}}


def dream_state_dict(c, seed=0):
    """Random weights under Dream's official names, biases included (non-zero)."""
    g = torch.Generator().manual_seed(seed)
    d, F_, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    r = lambda *shape: torch.randn(*shape, generator=g) * (shape[-1] ** -0.5 if len(shape) > 1 else 0.1)
    sd = {"model.embed_tokens.weight": r(V, d), "lm_head.weight": r(V, d), "model.norm.weight": 1 + r(d)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        sd.update({p + "input_layernorm.weight": 1 + r(d), p + "post_attention_layernorm.weight": 1 + r(d),
                   p + "self_attn.q_proj.weight": r(d, d), p + "self_attn.q_proj.bias": r(d),
                   p + "self_attn.k_proj.weight": r(kv, d), p + "self_attn.k_proj.bias": r(kv),
                   p + "self_attn.v_proj.weight": r(kv, d), p + "self_attn.v_proj.bias": r(kv),
                   p + "self_attn.o_proj.weight": r(d, d), p + "mlp.gate_proj.weight": r(F_, d),
                   p + "mlp.up_proj.weight": r(F_, d), p + "mlp.down_proj.weight": r(d, F_)})
    return sd


def write_dream_checkpoint(path, c, sd, dtype=torch.bfloat16):
    """Dream's layout: config.json, two safetensors shards and their index."""
    from safetensors.torch import save_file
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(c))
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k].to(dtype).contiguous() for k in ks}, str(path / name), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))


def dream_forward(sd, c, ids, am=None):
    """Dream's forward as its description says, returning its RAW logits (B, T, V), position i predicting i + 1."""
    B, T = ids.shape
    d, H, Hkv, eps = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    hd = d // H
    if am is None:  # no padding: no mask, positions 0 .. T-1
        pos, mask4 = torch.arange(T).expand(B, T), None
    else:  # cumsum positions (pads at 1); a pad neither attends nor is attended
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
        mask4 = am.bool()[:, None, None, :] & am.bool()[:, None, :, None]
    inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    ang = pos[..., None].float() * inv_freq
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # (B, 1, T, hd)

    def rope(x):  # rotate_half: the two halves of the head dim
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    def rms(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    x = sd["model.embed_tokens.weight"][ids]
    for n in range(c["num_hidden_layers"]):
        w = lambda name: sd[f"model.layers.{n}.{name}"]
        y = rms(x, w("input_layernorm.weight"))
        heads = lambda t, h: t.view(B, T, h, hd).transpose(1, 2)
        q = heads(y @ w("self_attn.q_proj.weight").T + w("self_attn.q_proj.bias"), H)
        k = heads(y @ w("self_attn.k_proj.weight").T + w("self_attn.k_proj.bias"), Hkv)
        v = heads(y @ w("self_attn.v_proj.weight").T + w("self_attn.v_proj.bias"), Hkv)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # not causal
        if mask4 is not None:
            scores = scores.masked_fill(~mask4, float("-inf"))
        att = torch.softmax(scores, -1).nan_to_num(0.0)  # a pad query's row is all masked: never read
        x = x + (att @ v).transpose(1, 2).reshape(B, T, d) @ w("self_attn.o_proj.weight").T
        y = rms(x, w("post_attention_layernorm.weight"))
        gate, up = y @ w("mlp.gate_proj.weight").T, y @ w("mlp.up_proj.weight").T
        x = x + (F.silu(gate) * up) @ w("mlp.down_proj.weight").T
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def shifted(logits):
    """What every consumer of Dream's logits applies: the prediction for position j is read from j - 1."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 117, (3, 11), generator=g)
    am = torch.ones(3, 11, dtype=torch.long)
    am[1, :4] = 0
    am[2, :1] = 0
    return ids, am


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    sd = dream_state_dict(CONFIG)
    path = tmp_path_factory.mktemp("dream") / "Dream-tiny"
    write_dream_checkpoint(path, CONFIG, sd, torch.float32)
    M.tiny_tokenizer("dream").save_pretrained(str(path))  # a tokenizer beside the weights, as a checkpoint has
    return path, sd


def test_a_dream_checkpoint_gives_the_official_logits_shifted_plain_and_left_padded(checkpoint):
    path, sd = checkpoint
    model = W.load_model(str(path))
    assert model.cfg.arch == "dream" and model.cfg.rope_theta == 1e6 and model.cfg.n_kv_heads == 2
    ids, am = batches()
    with torch.no_grad():
        ours, theirs = model(ids), dream_forward(sd, CONFIG, ids)
        torch.testing.assert_close(ours, shifted(theirs), atol=1e-5, rtol=0)
        assert (ours - theirs).abs().max() > 0.1  # a model without the shift would fail the line above
        ours_p, theirs_p = model(ids, am), shifted(dream_forward(sd, CONFIG, ids, am))
    real = am.bool()
    real[:, 1:] &= am.bool()[:, :-1]  # a position whose prediction is read from a real position (j - 1 real)
    torch.testing.assert_close(ours_p[real], theirs_p[real], atol=1e-5, rtol=0)
    # positions count from the first real token: the padded row equals the same tokens alone
    torch.testing.assert_close(ours_p[1, 5:], model(ids[1:2, 4:])[0, 1:].detach(), atol=1e-5, rtol=0)


def test_dream_loads_from_bf16_shards_and_saves_its_own_layout_back(checkpoint, tmp_path):
    path, sd = checkpoint
    write_dream_checkpoint(tmp_path / "bf16", CONFIG, sd, torch.bfloat16)
    model = W.load_model(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    ids, _ = batches()
    want = shifted(dream_forward({k: v.to(torch.bfloat16).float() for k, v in sd.items()}, CONFIG, ids))
    torch.testing.assert_close(model(ids).float(), want, atol=0.15, rtol=0.05)  # bf16 compute
    fp32 = W.load_model(str(path))
    W.save_model(fp32, str(tmp_path / "saved"), max_shard_bytes=20_000)
    index = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)  # Dream's names, biases included
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert {k: saved[k] for k in CONFIG} == CONFIG  # every field back, auto_map included
    again = W.load_model(str(tmp_path / "saved"))
    for k, v in again.state_dict().items():
        assert torch.equal(v, fp32.state_dict()[k]), k


def test_tiny_dream_is_the_same_code_path_with_biases_and_the_shift():
    model, tok = W.build("tiny-dream")
    assert model.cfg.arch == "dream" and model.model.transformer.blocks[0].q_proj.bias is not None
    assert tok.mask_token_id == model.cfg.mask_token_id and "<|im_start|>assistant\n" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    assert W.build("tiny")[0].model.transformer.blocks[0].q_proj.bias is None


def dream_sample(sd, c, prompt, am, L, steps, alg, eps=1e-3):
    """Dream's _sample loop at temperature 0 for a deterministic alg, as its description says, on the raw forward."""
    mask, B = c["mask_token_id"], prompt.shape[0]
    x = F.pad(prompt, (0, L), value=mask)
    am = None if am is None else F.pad(am, (0, L), value=1)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask
        logits = shifted(dream_forward(sd, c, x, am))
        probs = torch.softmax(logits[mask_index], -1)
        t, s = timesteps[i], timesteps[i + 1]
        conf, x0 = probs.max(-1)
        if alg == "topk_margin":
            top = probs.sort(-1, descending=True).values
            conf = top[:, 0] - top[:, 1]
        elif alg == "entropy":
            conf = (probs * torch.log(probs + 1e-10)).sum(-1)
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        n = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full = torch.full(x.shape, float("-inf"))
        full[mask_index] = conf
        if n > 0:
            idx = torch.topk(full, n).indices
            x_ = torch.full_like(x, mask)
            x_[mask_index] = x0
            rows = torch.arange(B)[:, None].expand_as(idx)
            x[rows, idx] = x_[rows, idx]
    return x


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dreams_sampler_gives_the_tokens_of_diffusion_generate_at_temperature_0(checkpoint, alg):
    import sample as S
    path, sd = checkpoint
    model = W.load_model(str(path))
    ids, am = batches()
    prompt, pam = ids[:, :7], am[:, :7]
    for steps in (12, 5):  # one token per step, and fewer steps than tokens (some steps commit none)
        for a in (None, pam):
            p = prompt if a is not None else prompt[[0]]
            want = dream_sample(sd, CONFIG, p, a, 12, steps, alg)
            out = S.generate(model, p, a, gen_length=12, steps=steps, temperature=0.0, alg=alg)
            assert torch.equal(out.sequences, want), (alg, steps, a is not None)
            assert not (out.completion == CONFIG["mask_token_id"]).any()


def test_the_sft_loss_and_every_rl_estimate_read_dreams_shifted_logits(checkpoint):
    """SFT's loss, d1's one-step estimator and the masked copies of wd1 / SPG / ESPO (methods.masked_logps) on a
    Dream checkpoint equal hand computations from the transcription's logits AFTER the shift, and differ from the
    unshifted ones (a consumer that forgot the shift would pass the first check only by accident)."""
    import diffu_grpo as D
    import methods
    import sft
    path, sd = checkpoint
    model, mask = W.load_model(str(path)), CONFIG["mask_token_id"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 117, (2, 11), generator=g)
    t, u, start = torch.tensor([0.5, 0.8]), torch.rand(2, 11, generator=g), torch.tensor([3, 5])

    def sft_by_hand(shift):
        p = ((1 - 1e-3) * t + 1e-3)[:, None]
        masked = (torch.arange(11)[None] >= start[:, None]) & (u < p)
        raw = dream_forward(sd, CONFIG, torch.where(masked, mask, ids))
        ce = F.cross_entropy((shifted(raw) if shift else raw).flatten(0, 1), ids.flatten(), reduction="none")
        per = torch.where(masked, ce.view(2, 11) / p, 0.0)
        return (per.sum(1) / (11 - start)).mean()

    with torch.no_grad():
        loss = sft.sft_loss(model, ids, start, mask, t, u)
        torch.testing.assert_close(loss, sft_by_hand(True), atol=1e-5, rtol=1e-5)
        assert abs(loss - sft_by_hand(False)) > 1e-2

        prompt, completion = ids[:, :5], ids[:, 5:]
        pa = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
        pattern = torch.rand(2, 5, generator=g) < 0.3
        ours = D.per_token_logps(model, prompt, pa, completion, pattern, mask)
        x = D.masked_input(prompt, pattern, 6, mask)
        raw = dream_forward(sd, CONFIG, x, torch.cat([pa, torch.ones(2, 6, dtype=torch.long)], 1))
        for logits, same in ((shifted(raw), True), (raw, False)):
            want = logits[:, 5:].log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
            assert torch.allclose(ours, want, atol=1e-5) == same

        pm, cm = torch.rand(2, 3, 5, generator=g) < 0.2, torch.rand(2, 3, 6, generator=g) < 0.5
        ours = methods.masked_logps(model, prompt, pa, completion, pm, cm)  # (2, 3, 6)
        for c in range(3):
            xc = torch.where(torch.cat([pm[:, c], cm[:, c]], 1), mask, ids)
            logits = shifted(dream_forward(sd, CONFIG, xc, torch.cat([pa, torch.ones(2, 6, dtype=torch.long)], 1)))
            want = logits[:, 5:].log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
            torch.testing.assert_close(ours[:, c], want, atol=1e-5, rtol=0)


def test_lora_targets_and_peft_adapters_use_dreams_module_names_and_keep_its_biases(checkpoint, tmp_path):
    path, _ = checkpoint
    model = W.load_model(str(path))
    ids, am = batches()
    with torch.no_grad():
        plain = model(ids, am)
    M.apply_lora(model, 4, 8, targets=("q_proj", "o_proj", "down_proj", "lm_head"),
                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a fresh adapter (B = 0) changes nothing: the wrapped q_proj keeps its bias
        torch.testing.assert_close(model(ids, am), plain, atol=0, rtol=0)
    adapted = {n for n, m in model.named_modules() if isinstance(m, M.LoRALinear)}
    assert "model.transformer.blocks.0.attn_out" in adapted and "model.transformer.blocks.1.ff_out" in adapted
    assert "model.transformer.ff_out" in adapted and "model.transformer.blocks.0.ff_proj" not in adapted
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    W.save_peft(model, str(tmp_path / "peft"), str(path))
    cfg = json.loads((tmp_path / "peft" / W.PEFT_CONFIG).read_text())
    assert cfg["target_modules"] == ["down_proj", "lm_head", "o_proj", "q_proj"]
    keys = W.read_safetensors(str(tmp_path / "peft" / W.PEFT_WEIGHTS), keys_only=True)
    assert "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys
    back, _ = W.build(str(tmp_path / "peft"))  # its base, with the adapter applied
    W.save_model(model, str(tmp_path / "merged"), merge=True)  # the merged export keeps the q/k/v biases
    with torch.no_grad():
        torch.testing.assert_close(back(ids, am), model(ids, am), atol=1e-5, rtol=0)
        torch.testing.assert_close(W.load_model(str(tmp_path / "merged"))(ids, am), model(ids, am), atol=1e-5, rtol=0)
        torch.testing.assert_close(M.merge_lora(model)(ids, am), back(ids, am), atol=1e-5, rtol=0)


def test_the_two_readme_commands_run_on_tiny_dream(tmp_path):
    """python sft.py --model tiny-dream, then diffu_grpo.py from its export: Dream's chat template and end of turn,
    exports in Dream's layout that load back as Dream, and RL on the same code path."""
    import diffu_grpo as D
    import sft
    sft.main(["--model", "tiny-dream", "--max-steps", "4", "--train-n", "16", "--eval-n", "4", "--batch-size", "4",
              "--micro-batch-size", "4", "--out-dir", str(tmp_path / "sft")])
    assert json.loads((tmp_path / "sft/final/config.json").read_text())["model_type"] == "Dream"
    D.main(["--model", str(tmp_path / "sft/final"), "--max-steps", "2", "--prompts-per-step", "2",
            "--out-dir", str(tmp_path / "rl")])
    model, tok = W.build(str(tmp_path / "rl/final"))
    assert model.cfg.arch == "dream" and tok.eos_token == "<|endoftext|>"
    assert "model.layers.0.self_attn.q_proj.bias" in W.read_safetensors(
        str(tmp_path / "rl/final/model.safetensors"), keys_only=True)


def test_the_lm_eval_model_decodes_a_dream_export_with_dreams_sampler(tmp_path):
    pytest.importorskip("lm_eval")
    import types

    import lmeval
    import sample as S
    from harness import export_model
    model, tok = W.build("tiny-dream")
    export_model(str(tmp_path / "final"), model, tok)
    lm = lmeval.LLaDAEvalModel(pretrained=str(tmp_path / "final"), gen_length=12, steps=6, batch_size=2)
    assert lm.sampling["alg"] == "entropy"
    contexts = ["sudoku 1030020040000301", "2+2="]
    got = lm.generate_until([types.SimpleNamespace(args=(c, {"until": ["\n"]})) for c in contexts])
    ids, mask = S.pad_left([tok(c, add_special_tokens=False)["input_ids"] for c in contexts], tok.pad_token_id)
    out = S.generate(lm.model, ids, mask, gen_length=12, steps=6, alg="entropy",
                     generator=lmeval.request_generator(lm.seed, contexts[0]))
    assert got == [t.split("\n")[0] for t in S.decode_completions(tok, out.completion, lm.model.cfg.eos_token_id)]
    (ll, _), = lm.loglikelihood([types.SimpleNamespace(args=("2+2=", "4"))])
    assert ll < 0


def test_sample_py_shows_dreams_canvas_and_says_which_fast_modes_apply(capsys):
    """`sample.py --alg entropy --show` on tiny Dream; threshold decoding (LLaDA's block sampler) runs on Dream,
    the prefix cache is refused in one sentence (the shift reads the cached position)."""
    import sample as S
    S.main(["--model", "tiny-dream", "--alg", "entropy", "--gen-length", "8", "--steps", "4", "--show",
            "--color", "never", "--prompt", "hi"])
    out = capsys.readouterr().out
    assert out.count("step ") == 4 and "8 tokens" in out
    model, tok = W.build("tiny-dream")
    ids = torch.tensor([tok("sudoku 1030")["input_ids"]])
    fast = S.generate(model, ids, gen_length=8, block_length=4, steps=4, threshold=0.0)
    assert fast.forward_passes == 2 and not (fast.completion == model.cfg.mask_token_id).any()
    with pytest.raises(ValueError, match="prefix cache does not apply to Dream"):
        S.generate(model, ids, gen_length=8, block_length=4, steps=4, prefix_cache=True)


def test_rl_with_the_prefix_cache_on_dream_is_refused_before_any_rollout(tmp_path):
    """--prefix-cache cannot serve Dream (the shift reads the cached position before each block): diffu_grpo.py says
    so in one line with exit 2 once the model is built, not with a traceback at its first rollout."""
    from test_runs import cli
    p = cli("diffu_grpo.py", ["--model", "tiny-dream", "--prefix-cache", "--max-steps", "2", "--out-dir",
                              str(tmp_path / "rl")])
    assert p.returncode == 2 and "does not apply to Dream" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_dream_run_resumes_from_its_checkpoint_in_dreams_layout(tmp_path):
    """A checkpoint is written in the official layout, for Dream under Dream's names (lm_head, model.layers...):
    --resume maps them back, and the halted-then-resumed run ends where the uninterrupted one ends, bit for bit."""
    import sft
    from test_sft import TINY_SFT, read_weights
    steps = TINY_SFT + ["--model", "tiny-dream", "--max-steps", "2", "--save-every", "1", "--train-n", "8",
                        "--batch-size", "2", "--micro-batch-size", "2", "--eval-n", "2"]
    sft.main(steps + ["--out-dir", str(tmp_path / "straight")])
    sft.main(steps + ["--out-dir", str(tmp_path / "halted"), "--halt-after", "1"])
    assert "lm_head.weight" in W.read_safetensors(str(tmp_path / "halted" / "checkpoint" / "model.safetensors"),
                                                  keys_only=True)
    sft.main(steps + ["--out-dir", str(tmp_path / "halted"), "--resume"])
    a, b = read_weights(str(tmp_path / "straight" / "final")), read_weights(str(tmp_path / "halted" / "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
