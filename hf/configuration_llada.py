"""
transformers' view of an export's config.json: AutoConfig.from_pretrained(EXPORT, trust_remote_code=True) builds
this. It keeps every field of the file as it is (LLaDA's official names: d_model, n_layers, n_heads, ...); the
network reads them through model.py's LLaDAConfig. Shipped in every export (weights.save_model), with
modeling_llada.py and the project's model.py beside it.
"""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
