"""Settings of the transformer core (``model:`` in a config), beside the model they describe."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from latentlm.errors import LatentLMError
from latentlm.settings import positive


# What each ``model.arch`` gives the settings left ``None`` (docs/METHODS.md §0).
ARCH_PRESETS: dict[str, dict[str, object]] = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", tie_embeddings=True, bias=True,
                 parallel_residual=False, rotary_pct=1.0),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, bias=False,
                  parallel_residual=False, rotary_pct=1.0),
    # GPT-NeoX as Pythia configures it (Hugging Face GPTNeoXConfig: hidden_act gelu, rotary_pct 0.25,
    # use_parallel_residual true, tie_word_embeddings false, layer_norm_eps 1e-5).
    "neox": dict(pos="rope", norm="layernorm", mlp="gelu_exact", tie_embeddings=False, bias=True,
                 parallel_residual=True, rotary_pct=0.25),
}


@dataclass
class ModelConfig:
    """The transformer core. ``arch`` picks the docs/METHODS.md §0 preset; the ``None`` fields
    take that preset's value (:data:`ARCH_PRESETS`: gpt2: learned positions, LayerNorm, GELU
    (tanh), tied, biases; llama: RoPE, RMSNorm, SwiGLU, untied, no biases; neox (GPT-NeoX /
    Pythia): parallel residual, RoPE on the first 25% of each head's dims, LayerNorm, exact GELU,
    untied, biases)."""

    arch: Literal["gpt2", "llama", "neox"] = "gpt2"
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence (in slots) the positions support
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    n_embd: int = 768
    ffn_hidden: int | None = None  # None: 4d for GELU, 8d/3 rounded up to 64 for SwiGLU
    pos: Literal["learned", "rope"] | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "gelu_exact", "swiglu"] | None = None  # gelu: tanh approximation; gelu_exact: erf
    tie_embeddings: bool | None = None
    bias: bool | None = None
    parallel_residual: bool | None = None  # x + attn(norm1(x)) + mlp(norm2(x)) instead of one after the other
    rotary_pct: float | None = None  # RoPE on the first int(head_dim * rotary_pct) dims of each head
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0
    embed_scale: float = 1.0  # multiplies token embeddings (PonderLM-2 uses sqrt(2.5 d))
    init_std: float = 0.02
    vocab_multiple: int = 64  # pad the embedding/head rows to a multiple of this for speed

    def resolved(self) -> "ModelConfig":
        """A copy with every preset-dependent ``None`` filled in."""
        c = dataclasses.replace(self)
        for key, value in ARCH_PRESETS[c.arch].items():
            if getattr(c, key) is None:
                setattr(c, key, value)
        c.n_kv_head = c.n_kv_head or c.n_head
        if c.ffn_hidden is None:
            c.ffn_hidden = 64 * math.ceil(8 * c.n_embd / 3 / 64) if c.mlp == "swiglu" else 4 * c.n_embd
        return c

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (Hugging Face GPTNeoX's rounding)."""
        return int(self.n_embd // self.n_head * self.resolved().rotary_pct)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return m * math.ceil(self.vocab_size / m)

    def validate(self) -> None:
        positive(self, "model", "vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                  "vocab_multiple", "norm_eps", "rope_theta", "embed_scale", "init_std")
        if self.n_embd % self.n_head:
            raise LatentLMError(f"model.n_head={self.n_head} does not divide model.n_embd={self.n_embd}; "
                                "choose a head count that divides the width")
        kv = self.n_kv_head or self.n_head
        if kv <= 0 or self.n_head % kv:
            raise LatentLMError(f"model.n_kv_head={self.n_kv_head} must be positive and divide "
                                f"model.n_head={self.n_head}")
        r = self.resolved()
        if not 0.0 < r.rotary_pct <= 1.0:
            raise LatentLMError(f"model.rotary_pct={self.rotary_pct} must be in (0, 1]: the fraction of each "
                                "head's dims that RoPE rotates")
        if r.pos == "rope" and (r.rotary_dim == 0 or r.rotary_dim % 2):
            raise LatentLMError(f"RoPE needs an even, positive number of rotary dims, got int(head size "
                                f"{self.n_embd // self.n_head} x model.rotary_pct {r.rotary_pct}) = {r.rotary_dim}; "
                                "choose another model.rotary_pct or head size")
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            raise LatentLMError(f"model.ffn_hidden={self.ffn_hidden} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise LatentLMError(f"model.dropout={self.dropout} must be in [0, 1)")
