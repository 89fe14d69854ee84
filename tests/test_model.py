import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import model as M
import weights as W
from conftest import OFFICIAL_TINY_CONFIG, TINY, llada_only, write_official_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_official_sharded_checkpoint_loads_every_tensor(tmp_path):
    tensors = write_official_checkpoint(tmp_path / "ckpt", n_shards=3)
    model = W.load_model(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    sd = model.state_dict()
    assert set(sd) == set(tensors)
    for k, t in tensors.items():
        assert torch.equal(sd[k], t), k
    assert model.cfg.d_model == 64 and model.cfg.mask_token_id == 2 and model.cfg.embedding_size == 112


def test_missing_or_unexpected_key_is_named_in_the_error(tmp_path):
    write_official_checkpoint(tmp_path / "a", drop="model.transformer.blocks.1.up_proj.weight")
    with pytest.raises(KeyError, match=r"missing \(1\).*blocks\.1\.up_proj\.weight"):
        W.load_model(str(tmp_path / "a"))
    write_official_checkpoint(tmp_path / "b", add="model.transformer.rotary.inv_freq")
    with pytest.raises(KeyError, match=r"unexpected \(1\).*rotary\.inv_freq"):
        W.load_model(str(tmp_path / "b"))


@pytest.mark.parametrize("field,value", [("block_type", "sequential"), ("activation_type", "gelu"),
                                         ("include_bias", True), ("alibi", True)])
def test_unsupported_config_fields_are_rejected_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        M.LLaDAConfig.from_dict({**OFFICIAL_TINY_CONFIG, field: value})


def test_config_round_trips_through_official_field_names():
    cfg = M.LLaDAConfig.from_dict(OFFICIAL_TINY_CONFIG)
    d = cfg.to_dict()
    for k, v in OFFICIAL_TINY_CONFIG.items():
        assert d[k] == v, k
    assert M.LLaDAConfig.from_dict(d) == cfg


def test_unreachable_hub_id_fails_with_a_message_naming_it_and_the_local_path_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(M.UsageError, match=r"(?s)'someone/not-cached-model'.*--model DIR"):
        W.load_model("someone/not-cached-model")


def test_a_missing_local_directory_is_reported_as_such_not_as_a_hub_id(tmp_path):
    with pytest.raises(M.UsageError, match="no such directory"):
        W.load_model(str(tmp_path / "out" / "final"))


def test_attention_is_bidirectional(tiny):
    ids = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(1))
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % 100
    assert not torch.allclose(tiny(ids)[0, 0], tiny(other)[0, 0])


@llada_only
def test_left_padded_rows_match_their_unpadded_logits_and_all_ones_mask_is_the_no_mask_path(tiny):
    g = torch.Generator().manual_seed(2)
    lens = [12, 7, 3]
    T = max(lens)
    rows = [torch.randint(3, 100, (n,), generator=g) for n in lens]
    ids = torch.full((3, T), 1)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    batched = tiny(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = tiny(r[None])
        torch.testing.assert_close(batched[i, T - len(r):], alone[0], atol=1e-5, rtol=0)
    full = torch.ones_like(mask)
    assert torch.equal(tiny(ids, attention_mask=full), tiny(ids))


def test_rmsnorm_equals_torchs_rms_norm_and_casts_before_the_weight_in_bf16():
    """Against PyTorch's own implementation (F.rms_norm), and in bf16 the official order: normalise in fp32, cast
    back, then multiply by the weight (a different order changes bf16 logits)."""
    norm = M.RMSNorm(8, 1e-5)
    w = torch.linspace(0.5, 2.0, 8)
    with torch.no_grad():
        norm.weight.copy_(w)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), w, eps=1e-5))
    xb, nb = x.to(torch.bfloat16), norm.to(torch.bfloat16)
    assert torch.equal(nb(xb), F.rms_norm(xb.float(), (8,), eps=1e-5).to(torch.bfloat16) * w.to(torch.bfloat16))


def test_rope_rotates_each_half_pair_by_position_times_frequency():
    hd, theta, T = 8, 10000.0, 5
    x = torch.randn(1, 1, T, hd, generator=torch.Generator().manual_seed(0))
    cos, sin = M.rope_cos_sin(torch.arange(T), hd, theta)
    got = M.apply_rope(x, cos, sin)
    want = torch.empty_like(x)
    for t in range(T):
        for i in range(hd // 2):  # pair (i, i + hd/2) is a complex number rotated by angle t * theta^(-2i/hd)
            ang = t * theta ** (-2 * i / hd)
            z = complex(x[0, 0, t, i], x[0, 0, t, i + hd // 2]) * complex(torch.cos(torch.tensor(ang)),
                                                                         torch.sin(torch.tensor(ang)))
            want[0, 0, t, i], want[0, 0, t, i + hd // 2] = z.real, z.imag
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_rotated_query_key_products_depend_only_on_the_position_difference():
    """RoPE's defining property, independent of how it is written: <R_m q, R_n k> is a function of m - n."""
    hd, theta = 16, 500000.0
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, hd, generator=g), torch.randn(1, 1, 1, hd, generator=g)
    cos, sin = M.rope_cos_sin(torch.arange(40), hd, theta)
    rot = lambda x, p: M.apply_rope(x, cos[p:p + 1], sin[p:p + 1])
    dot = lambda m, n: (rot(q, m) * rot(k, n)).sum().item()
    for m, n, shift in [(3, 1, 10), (7, 7, 25), (0, 5, 30)]:
        assert abs(dot(m, n) - dot(m + shift, n + shift)) < 1e-4
    assert abs(dot(3, 1) - dot(1, 3)) > 1e-3  # but not of |m - n|: the rotation has a direction


def test_bf16_forward_gives_bf16_logits(tiny):
    m = tiny.to(torch.bfloat16)
    out = m(torch.arange(10)[None])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    tiny.train()
    grads = []
    for ckpt in (False, True):
        tiny.zero_grad()
        tiny.gradient_checkpointing = ckpt
        tiny(ids).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in tiny.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_lora_fresh_unchanged_off_switch_is_exact_and_merge_reproduces_adapted(tiny):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(4))
    base = tiny(ids).detach()
    M.apply_lora(tiny, r=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny(ids), base)  # B = 0
    trainable = [p for p in tiny.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    # A and B for each of the 4 modules d1's PEFT config matched (q/k/v/up) in every block; not the LM head
    assert len(trainable) == 2 * 4 * tiny.cfg.n_layers
    assert {n.split(".")[-2] for n, p in tiny.named_parameters() if p.requires_grad} == \
        {"q_proj", "k_proj", "v_proj", "up_proj"}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    tiny(ids).logsumexp(-1).mean().backward()
    opt.step()
    adapted = tiny(ids).detach()
    assert not torch.allclose(adapted, base)
    with M.lora_disabled(tiny):
        assert torch.equal(tiny(ids), base)
    assert torch.equal(tiny(ids), adapted)  # switched back on
    M.merge_lora(tiny)
    assert not M.has_lora(tiny)
    torch.testing.assert_close(tiny(ids), adapted, atol=1e-5, rtol=0)


def test_save_load_round_trip_plain_lora_merged_and_adapter_alone(tiny, tok, tmp_path):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    W.save_model(tiny, str(tmp_path / "plain"), tok, max_shard_bytes=600_000)  # forces several shards
    assert (tmp_path / "plain" / "model.safetensors.index.json").exists()
    assert (tmp_path / "plain" / "tokenizer.json").exists()
    assert torch.equal(W.load_model(str(tmp_path / "plain"))(ids), tiny(ids))
    M.apply_lora(tiny, r=4, alpha=8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in tiny.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    adapted = tiny(ids)
    W.save_model(tiny, str(tmp_path / "merged"), tok, merge=True)  # merged in fp32: official keys only
    loaded = W.load_model(str(tmp_path / "merged"))
    assert not M.has_lora(loaded)
    torch.testing.assert_close(loaded(ids), adapted, atol=1e-5, rtol=0)
    W.save_model(tiny, str(tmp_path / "adapter"), tok, merge=False)  # base weights + adapter.safetensors
    loaded = W.load_model(str(tmp_path / "adapter"))
    assert M.has_lora(loaded) and torch.equal(loaded(ids), adapted)
    reloaded_tok = W.load_tokenizer(str(tmp_path / "plain"))
    text = "<|startoftext|>hi 12<|endoftext|>"
    assert reloaded_tok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


@llada_only
def test_tiny_tokenizer_has_llada_roles_and_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "  2+2?  "}], tokenize=False)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.pad_token_id and tok.mask_token_id not in (tok.eos_token_id, None)
    assert tok.convert_ids_to_tokens(tok.mask_token_id) == "<|mdm_mask|>"


def test_loader_peak_memory_is_the_model_plus_about_one_shard(tmp_path):
    """Load an 8-shard fp32 checkpoint in a fresh process and read the kernel's peak-RSS counter (VmHWM, reset
    just before the load). Reading all shards at once would cost about twice the model."""
    cfg = {**OFFICIAL_TINY_CONFIG, "d_model": 512, "n_layers": 8, "mlp_hidden_size": 1536, "n_heads": 8,
           "n_kv_heads": 8}
    write_official_checkpoint(tmp_path / "big", cfg, n_shards=8, dtype=torch.float32)
    script = textwrap.dedent(f"""
        import json, sys, torch; sys.path.insert(0, {ROOT!r}); import weights as W
        def kb(field):
            return int([l for l in open('/proc/self/status') if l.startswith(field)][0].split()[1])
        open('/proc/self/clear_refs', 'w').write('5')  # reset VmHWM to the current RSS
        before = kb('VmRSS')
        m = W.load_model({str(tmp_path / 'big')!r})
        print(json.dumps(dict(before=before, peak=kb('VmHWM'), model_kb=sum(p.numel() * 4 for p in m.parameters()) // 1024)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    shard_kb = r["model_kb"] / 8
    extra = r["peak"] - r["before"] - r["model_kb"]
    assert extra < 3 * shard_kb + 20_000, r  # the model, plus at most ~ one shard read + its mmap, plus slack


def test_wide_lora_targets_adapt_every_linear_and_the_lm_head(tiny):
    M.apply_lora(tiny, r=4, alpha=8, targets=M.LORA_TARGETS_WIDE)
    trainable = [p for p in tiny.parameters() if p.requires_grad]
    assert len(trainable) == 2 * (7 * tiny.cfg.n_layers + 1)  # 7 per block + the untied head (also named ff_out)


def _small_update(model, rel_rms, seed=0):
    """Give every adapter a delta-W whose RMS is rel_rms of its base weight's RMS (d1's lr 3e-6 regime)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, M.LoRALinear):
                m.lora_B.normal_(0, 1, generator=g)
                d = m.scale * m.lora_B @ m.lora_A
                m.lora_B.mul_(rel_rms * m.weight.float().pow(2).mean().sqrt() / d.pow(2).mean().sqrt())


def test_export_of_a_bf16_lora_run_keeps_a_realistically_small_update(tok, tmp_path):
    """The export contract at d1's scale of update: a bf16 base, an adapter whose delta-W RMS is 3e-4 of the
    weights' RMS. A bf16 merge would keep almost none of it (refused); the exact export (base + adapter) and the fp32
    merge, loaded back, reproduce the update's effect on the logits to within 5%."""
    from harness import export_model
    model, _ = W.build(TINY, torch.bfloat16, seed=3)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(6))
    base = model(ids).float()
    M.apply_lora(model, r=8, alpha=16, generator=torch.Generator().manual_seed(0))
    _small_update(model, 3e-4)
    adapted = model(ids).float()
    effect = (adapted - base).norm()
    assert effect > 0
    assert M.merge_survival(model, torch.bfloat16) < 0.5  # most of the update would round away in bf16
    assert M.merge_survival(model, torch.float32) > 0.999
    with pytest.raises(ValueError, match="keep only"):
        W.save_model(model, str(tmp_path / "lossy"), tok, merge=True, merge_dtype=torch.bfloat16)
    export_model(str(tmp_path / "exact"), model, tok, mode="exact")
    loaded = W.load_model(str(tmp_path / "exact"), torch.bfloat16)
    assert (loaded(ids).float() - adapted).norm() <= 0.05 * effect
    # The fp32 merge is compared in fp32 (a bf16 forward's own rounding is as large as this update's effect).
    export_model(str(tmp_path / "merged"), model, tok, mode="merged")
    model32 = model.float()
    adapted32 = model32(ids)
    with M.lora_disabled(model32):
        effect32 = (adapted32 - model32(ids)).norm()
    loaded = W.load_model(str(tmp_path / "merged"), torch.float32)
    assert not M.has_lora(loaded)
    assert (loaded(ids) - adapted32).norm() <= 0.05 * effect32


def test_a_second_stage_keeps_the_first_adapter_frozen_exactly_and_exports_both(tok, tmp_path):
    """RL from the SFT model: the SFT adapter becomes frozen factors (part of the starting model, so also of the
    reference policy), a fresh adapter trains on top, and the exact export reloads the stacked policy."""
    model, _ = W.build(TINY, seed=4)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(7))
    base = model(ids).detach()
    M.apply_lora(model, r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj"))  # the SFT stage's adapter
    _small_update(model, 1e-2, seed=1)
    sft = model(ids).detach()
    W.save_model(model, str(tmp_path / "sft"), tok)
    start = W.load_model(str(tmp_path / "sft"))
    M.apply_lora(start, r=4, alpha=8, generator=torch.Generator().manual_seed(0))  # RL on d1's 4 targets
    assert all(not p.requires_grad for n, p in start.named_parameters() if "lora_frozen" in n)
    torch.testing.assert_close(start(ids), sft, atol=1e-5, rtol=0)  # fresh B = 0: the SFT model
    _small_update(start, 1e-2, seed=2)
    rl = start(ids).detach()
    assert not torch.allclose(rl, sft, atol=1e-4)
    with M.lora_disabled(start):  # the reference policy is the SFT model, not the base
        torch.testing.assert_close(start(ids), sft, atol=1e-5, rtol=0)
        assert not torch.allclose(start(ids), base, atol=1e-4)
    W.save_model(start, str(tmp_path / "rl"), tok)
    torch.testing.assert_close(W.load_model(str(tmp_path / "rl"))(ids), rl, atol=1e-6, rtol=0)


def test_local_rank_zero_loads_first_and_the_other_ranks_wait_at_a_barrier(tmp_path):
    """Two gloo ranks build a model from a checkpoint directory through common.build_model: rank 1 starts only after
    rank 0 has finished (so a hub download would happen once per node), and both get the same weights."""
    from conftest import ROOT, launch
    write_official_checkpoint(str(tmp_path / "ckpt"), n_shards=2)
    M.tiny_tokenizer().save_pretrained(str(tmp_path / "ckpt"))
    script = tmp_path / "two_loads.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {ROOT!r})
        import common, model as M, weights as W
        rank, local_rank, world, device = common.compute_init("cpu")
        real = W.build
        def slow_build(*a, **k):
            start = time.time()
            if rank == 0:
                time.sleep(1.0)  # a download takes a while
            out = real(*a, **k)
            with open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w") as f:
                json.dump({{"start": start, "end": time.time(),
                           "sum": float(sum(p.double().sum() for p in out[0].parameters()))}}, f)
            return out
        W.build = slow_build
        common.build_model({str(tmp_path / "ckpt")!r}, M.torch.float32, "cpu")
        common.compute_cleanup()
    """))
    launch(str(script), [], nproc=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["start"] >= r0["end"] - 0.05, (r0, r1)
    assert r0["sum"] == r1["sum"]
