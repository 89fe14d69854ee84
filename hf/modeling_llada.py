"""
transformers' view of an export: AutoModel / AutoModelForCausalLM.from_pretrained(EXPORT, trust_remote_code=True)
build LLaDAModelLM, a thin wrapper around the project's network. Every export ships three files for it:
configuration_llada.py, this file, and llada_model.py (the project's model.py, as it is). So a model trained here
loads in any tool that takes a transformers model, with the logits of the project's own load of the directory.

    model = AutoModel.from_pretrained("out/grpo/final", trust_remote_code=True, dtype=torch.float32)
    logits = model(input_ids, attention_mask=mask).logits          # (B, T, V): LLaDA's mask predictor

An exact LoRA export (base weights + adapter.safetensors) gets its adapter applied, as weights.load_model does, so
the loaded model is the trained policy whatever the export mode.
"""

import os

from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_llada import LLaDAConfig
from .llada_model import LLaDA, LLaDAConfig as NetworkConfig, load_adapter_state


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        network = LLaDA(NetworkConfig.from_dict(config.to_dict()))
        self.model = network.model  # model.transformer.*: the official key layout, the same modules as network's
        self._network = (network,)  # its forward (a tuple: not registered twice as a submodule)
        self.post_init()

    def _init_weights(self, module):
        """Nothing to initialise: the weights come from the export."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """logits (B, T, V) of every position; attention_mask (B, T), 1 = a real token (left padding)."""
        return MaskedLMOutput(logits=self._network[0](input_ids, attention_mask))

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        model = super().from_pretrained(path, *args, **kwargs)
        adapter = os.path.join(str(path), "adapter.safetensors")
        if os.path.isfile(adapter):
            from safetensors import safe_open
            with safe_open(adapter, framework="pt") as f:
                meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            load_adapter_state(model._network[0], sd, meta)
        return model
