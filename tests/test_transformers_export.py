"""Every export loads with transformers: AutoModel and AutoModelForCausalLM (trust_remote_code: the export ships
the code its config.json's auto_map names) give the logits of the project's own load of the same directory, for
the tiny model and the official architecture, full weights, merged LoRA and exact LoRA (adapter applied); the
tokenizer loads through AutoTokenizer without asking anything."""
import builtins

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import model as M
import weights as W
from conftest import llada_only, write_official_checkpoint
from harness import export_model


@pytest.fixture(autouse=True)
def no_prompt(monkeypatch):
    """transformers asks on stdin before it runs an export's code unless told: nothing here may ask."""
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail(f"transformers asked: {a}"))


def batch(tok):
    """A left-padded batch of two prompts (ids, attention mask)."""
    rows = [tok("sudoku 1030020040000301")["input_ids"], tok("hi")["input_ids"]]
    T = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (T - len(r)) + r for r in rows])
    return ids, (ids != tok.pad_token_id).long()


def assert_transformers_loads_what_we_load(path):
    ours, tok = W.build(str(path))
    ids, mask = batch(tok)
    want = ours(ids, mask)
    for auto in (AutoModel, AutoModelForCausalLM):
        theirs = auto.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float32)
        assert type(theirs).__name__ == "LLaDAModelLM"
        torch.testing.assert_close(theirs(ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)


def trained_lora(tiny):
    M.apply_lora(tiny, 4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in tiny.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return tiny


@pytest.mark.parametrize("kind", ["full", "lora exact", "lora merged", "stacked exact"])
@llada_only
def test_an_export_loads_in_transformers_with_the_projects_logits(tmp_path, tiny, tok, kind):
    model = tiny
    if kind != "full":
        model = trained_lora(tiny)
    if kind == "stacked exact":  # RL on top of an SFT adapter: the earlier stage's factors are frozen in the export
        M.apply_lora(model, 2, 4, generator=torch.Generator().manual_seed(2))
    export_model(str(tmp_path / "final"), model, tok, mode="merged" if "merged" in kind else "exact")
    assert (tmp_path / "final" / "modeling_llada.py").exists()
    assert_transformers_loads_what_we_load(tmp_path / "final")


def test_an_official_architecture_checkpoint_saved_here_loads_in_transformers(tmp_path, tok):
    write_official_checkpoint(str(tmp_path / "official"), dtype=torch.float32)
    model = W.load_model(str(tmp_path / "official"))
    W.save_model(model, str(tmp_path / "saved"), tok, max_shard_bytes=200_000)  # sharded, with an index
    assert_transformers_loads_what_we_load(tmp_path / "saved")


def test_autotokenizer_loads_an_export_without_asking_and_encodes_as_ours(tmp_path, tiny, tok):
    export_model(str(tmp_path / "final"), tiny, tok)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "final"), trust_remote_code=True)
    text = tok.apply_chat_template([{"role": "user", "content": "sudoku 1030020040000301"}], tokenize=False)
    assert theirs(text)["input_ids"] == tok(text)["input_ids"]
    assert (theirs.mask_token_id, theirs.eos_token_id) == (tok.mask_token_id, tok.eos_token_id)
