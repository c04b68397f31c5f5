"""Hugging Face transformers, both ways: `stackwise-export` writes an experiment's model as a folder
that `AutoModelForCausalLM.from_pretrained` loads with no custom code, `stackwise-import` starts an
experiment from a local Llama folder. Needs the `hf` extra (transformers) at run time.

    adapter.py    StateDictAdapter: the one name mapping (export, import and tests/test_parity_hf.py),
                  the transformers config of a ModelConfig, bidirectional_mask
    export.py     export_model: safetensors shards + config.json + the experiment's tokenizer files
    tokenizer.py  the experiment's tokenizer as transformers tokenizer files
    importer.py   read a Llama folder, write its embeddings and first layers as finished stages
"""

from stackwise.hf.adapter import (
    DEEPSEEK_LATENT_EPS,
    ExportError,
    StateDictAdapter,
    bidirectional_mask,
    full_state_dict,
    hf_model_type,
    require_transformers,
)

__all__ = [
    "DEEPSEEK_LATENT_EPS",
    "ExportError",
    "StateDictAdapter",
    "bidirectional_mask",
    "full_state_dict",
    "hf_model_type",
    "require_transformers",
]
