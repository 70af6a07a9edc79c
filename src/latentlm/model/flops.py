"""FLOP accounting for the transformer core.

Convention (PaLM appendix B, as nanoGPT and most MFU numbers use): a forward pass costs
2 FLOPs per multiply-accumulate of every weight matrix that touches a token, plus the
attention score and value products, 2 * 2 * n_layer * d * S per token for a context of S
slots (counted without the causal halving, as is customary). Training = 3 x forward.
Embedding lookups, norms, activations, biases and RoPE are ignored (element-wise work, O(d) per
slot and layer), so the presets differ only by their matrices: SwiGLU has three MLP matrices,
GELU (gpt2, neox) two; neox's parallel residual and partial rotary change no matrix.
"""

from __future__ import annotations

from latentlm.model.config import ModelConfig


def matmul_params(cfg: ModelConfig, n_layers: int | None = None, head: bool = True) -> int:
    """Weights that multiply each token: the blocks' linear layers (+ the LM head)."""
    c = cfg.resolved()
    d, hd = c.n_embd, c.n_embd // c.n_head
    attn = d * d * 2 + 2 * d * c.n_kv_head * hd  # q, o and k, v
    mlp = (3 if c.mlp == "swiglu" else 2) * d * c.ffn_hidden
    n = (c.n_layer if n_layers is None else n_layers) * (attn + mlp)
    return n + (d * c.padded_vocab_size if head else 0)


def forward_flops_per_slot(cfg: ModelConfig, context: int, n_layers: int | None = None,
                           head: bool = True) -> float:
    """Forward FLOPs for one slot (token) attending over ``context`` slots."""
    layers = cfg.n_layer if n_layers is None else n_layers
    return 2.0 * matmul_params(cfg, layers, head) + 4.0 * layers * cfg.n_embd * context


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Plain next-token training: 6N + 12 L d T per token."""
    return 3.0 * forward_flops_per_slot(cfg, seq_len)


# Dense bf16 peak FLOP/s of GPUs we know, for MFU (device name substrings, first match wins).
PEAK_BF16 = [("H200", 989e12), ("H100 SXM", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("RTX 4090", 165e12),
             ("RTX 3090", 71e12)]


def device_peak_flops(device) -> float | None:
    """The bf16 dense peak of a CUDA device, or None when unknown (CPU, unlisted GPUs)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)
