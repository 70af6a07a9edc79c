"""The one decoder-only transformer every method uses.

Three presets (``ModelConfig.arch``): ``gpt2`` (learned positions, LayerNorm, GELU, tied
embeddings, biases), ``llama`` (RoPE, RMSNorm, SwiGLU, untied, no biases) and ``neox`` (GPT-NeoX /
Pythia: parallel residual, partial RoPE, LayerNorm, exact GELU, untied, biases). They differ only
by the switches of :class:`ModelConfig`, read in the few places below.

Methods do not subclass or copy this model. They call its pieces:

- :meth:`Transformer.embed` scaled token embeddings ``[B, T, d]``;
- :meth:`Transformer.run_blocks` a slice ``blocks[start:end]`` on any ``inputs_embeds`` with
  explicit ``position_ids`` (several slots may share one), optionally through a
  :class:`KVCache` whose length may differ per layer;
- :meth:`Transformer.head` final norm, then logits over the real (unpadded) vocabulary.

Attention always runs through ``scaled_dot_product_attention``. Causality is by slot order,
not by position id, which is what interleaved sequences (concepts, thoughts, pauses) need.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from latentlm.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables ``[B, 1, T, head_dim]`` for the given positions (rotate-half layout);
    ``head_dim`` is the number of rotary dims (a head's size unless RoPE is partial)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_table(n: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin ``[n, head_dim]`` of positions 0..n-1 (the values :func:`rope_cos_sin` gives)."""
    return tuple(t[0, 0] for t in rope_cos_sin(torch.arange(n)[None], head_dim, theta, torch.float32))


def linear_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer gives for input ``x``: autocast's where it is on, else x's."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` dims of ``x``; the rest pass unchanged
    (GPT-NeoX's partial rotary, whose tables cover only the rotary dims)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Per-layer key/value buffers, preallocated to ``capacity`` slots.

    Each layer keeps its own length, so a method may append 2 slots per token in later layers
    and 1 in earlier ones. ``valid`` marks real (non-padding) key slots per layer; queries
    never attend to invalid keys, which is how left-padded batches of unequal prompts work.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch, n_kv_head, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.valid = [torch.zeros(batch, capacity, device=device, dtype=torch.bool) for _ in range(n_layer)]
        self.lengths = [0] * n_layer
        self.capacity = capacity
        self.padded = False  # set by the caller when some slots are padding (needs masks)
        self.static = False  # see make_static

    def make_static(self) -> "KVCache":
        """Switch an empty cache to static shapes, for a compiled decode step (``torch.compile``): each
        layer's write position is a device tensor (``slots``) instead of a Python int, and attention
        always reads all ``capacity`` slots through a mask (unwritten slots are invalid), so a step's
        shapes never change with the cache's length. ``lengths`` then stays at 0. Same values as the
        dynamic cache (tested); buffers are marked static for CUDA graphs on CUDA."""
        if any(self.lengths):
            raise RuntimeError("make_static needs an empty cache")
        device = self.k[0].device
        self.static = True
        self.slots = [torch.zeros((), dtype=torch.long, device=device) for _ in self.k]
        if device.type == "cuda":
            for t in (*self.k, *self.v, *self.valid, *self.slots):
                torch._dynamo.mark_static_address(t)
        return self

    def reset(self) -> "KVCache":
        """Empty the cache in place (same buffers: a compiled CUDA-graph decode step keeps reading them)."""
        for t in self.valid:
            t.zero_()
        for t in getattr(self, "slots", ()):
            t.zero_()
        self.lengths = [0] * len(self.lengths)
        self.padded = False
        return self

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        """Static-shape :meth:`append`: store ``k, v`` [B, H, T, hd] at ``slots[layer]`` and advance it;
        return the whole buffers and the boolean mask [B, 1, T, capacity] of the keys each new slot
        may see (earlier or itself, and valid; a slot always sees itself, as in :func:`attention_mask`)."""
        t = k.shape[2]
        start = self.slots[layer]
        index = start + torch.arange(t, device=k.device)
        self.k[layer].index_copy_(2, index, k)
        self.v[layer].index_copy_(2, index, v)
        self.valid[layer].index_copy_(1, index, valid)
        start.add_(t)
        key = torch.arange(self.capacity, device=k.device)[None, :]
        visible = (key <= index[:, None]) & self.valid[layer][:, None, None, :]
        return self.k[layer], self.v[layer], visible | (key == index[:, None])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        """Store ``k, v`` [B, H, T, hd] at the end of ``layer``; return all keys, values, validity."""
        start, t = self.lengths[layer], k.shape[2]
        if start + t > self.capacity:
            raise RuntimeError(f"KV cache full: layer {layer} holds {start} of {self.capacity} slots, "
                               f"cannot add {t}")
        self.k[layer][:, :, start:start + t] = k
        self.v[layer][:, :, start:start + t] = v
        self.valid[layer][:, start:start + t] = valid
        self.lengths[layer] = end = start + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], self.valid[layer][:, :end]

    def select_rows(self, rows: torch.Tensor, capacity: int) -> "KVCache":
        """A new cache of ``capacity`` slots per layer holding this cache's rows ``rows`` (int64 [R],
        repeats allowed): e.g. one shared context's keys and values for each of its continuations."""
        b, h, _, hd = self.k[0].shape
        out = KVCache(len(self.k), len(rows), h, hd, capacity, self.k[0].device, self.k[0].dtype)
        for layer, n in enumerate(self.lengths):
            out.k[layer][:, :, :n] = self.k[layer][rows, :, :n]
            out.v[layer][:, :, :n] = self.v[layer][rows, :, :n]
            out.valid[layer][:, :n] = self.valid[layer][rows, :n]
        out.lengths, out.padded = list(self.lengths), self.padded
        return out


def attention_mask(n_query: int, past: int, key_valid: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
    """Boolean SDPA mask ``[B or 1, 1, Tq, past + Tq]``: causal by slot, invalid keys hidden.

    A query may always see itself, so a padding query never has an empty row (which would give
    NaN); its output is garbage and is never used.
    """
    q = torch.arange(n_query, device=device)[:, None] + past
    k = torch.arange(past + n_query, device=device)[None, :]
    mask = k <= q
    if key_valid is not None:
        mask = (mask & key_valid[:, None, None, :]) | (k == q)
    return mask if mask.dim() == 4 else mask[None, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.o_proj.is_residual_out = True
        self.dropout = cfg.dropout

    def forward(self, x, rope, cache: KVCache | None, valid: torch.Tensor | None, mask, cache_offset: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
            layer = self.layer + cache_offset
            if cache.static:
                k, v, mask = cache.write(layer, k, v, valid)
            else:
                past = cache.lengths[layer]
                k, v, key_valid = cache.append(layer, k, v, valid)
                # Unpadded, a one-slot decode step needs no mask and a prefill into an empty cache is
                # plain causal attention: both stay on the fast kernels. Several slots after a past
                # (a token and its concept or pauses) need the explicit mask: is_causal is top-left aligned.
                mask = attention_mask(T, past, key_valid if cache.padded else None, x.device) \
                    if cache.padded or (past and T > 1) else None
        elif mask is None and valid is not None:
            mask = attention_mask(T, 0, valid, x.device)
        rep = self.n_head // self.n_kv_head
        if rep > 1 and T == 1 and cache is not None:
            # A one-slot decode step with grouped-query attention: the rep query heads of a key/value
            # head act as rep query rows against it, so the cache is read as it is, never repeated.
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_head, rep, self.head_dim), k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
            return self.o_proj(y.reshape(B, 1, -1))
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.gelu = "tanh" if cfg.mlp == "gelu" else "none"  # gelu_exact: the erf form (Pythia's)
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        if self.swiglu:
            self.gate = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)
        self.down.is_residual_out = True

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x), approximate=self.gelu)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.parallel = cfg.parallel_residual

    def forward(self, x, rope=None, cache=None, valid=None, mask=None, cache_offset: int = 0):
        a = self.drop(self.attn(self.norm1(x), rope, cache, valid, mask, cache_offset))
        if self.parallel:  # GPT-NeoX: attention and MLP both read the block's input
            return x + a + self.drop(self.mlp(self.norm2(x)))
        x = x + a
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos == "rope":  # computed once, not on every run_blocks call; not saved in checkpoints
            cos, sin = rope_table(cfg.block_size, cfg.rotary_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The ``model.init`` scheme (one for every method, docs/METHODS.md §0), in module order:

        - ``normal``: Normal(0, init_std) weights, the residual output projections (``o_proj``,
          ``mlp.down``) at init_std / sqrt(2 n_layer) (GPT-2) so the residual stream's variance does
          not grow with depth;
        - ``trunc_normal`` (the PonderLM-2 authors' models): a normal of std s = sqrt(2 / (5 d))
          truncated at +-3 s for every linear and embedding weight, the residual output projections
          at s / sqrt(2 n_layer), truncated at 3 of their std;
        - ``hf_normal``: Normal(0, init_std) for every linear and embedding weight (no depth scaling).

        Biases are zero and norm gains one in all three.
        """
        scheme = self.cfg.init
        for m in self.modules():
            if isinstance(m, nn.Linear):
                residual = getattr(m, "is_residual_out", False) and scheme != "hf_normal"
                self._init_weight(m.weight, residual)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                self._init_weight(m.weight)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def _init_weight(self, weight: torch.Tensor, residual: bool = False) -> None:
        """Draw ``weight`` in place from the scheme's distribution (``residual``: std / sqrt(2 n_layer))."""
        trunc = self.cfg.init == "trunc_normal"
        std = self.cfg.trunc_normal_std if trunc else self.cfg.init_std
        if residual:
            std = std / math.sqrt(2 * self.cfg.n_layer)
        if trunc:
            nn.init.trunc_normal_(weight, 0.0, std, a=-3.0 * std, b=3.0 * std)
        else:
            nn.init.normal_(weight, 0.0, std)

    def init_embedding_(self, weight: torch.Tensor) -> torch.Tensor:
        """Draw a method's own embedding-like parameter (e.g. pause tokens) in place as the token
        embeddings are drawn, so it follows ``model.init`` too; returns ``weight``."""
        with torch.no_grad():
            self._init_weight(weight)
        return weight

    # --- pieces ---------------------------------------------------------------------------

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings times ``embed_scale`` (no positions)."""
        x = self.wte(idx)
        return x * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else x

    def run_blocks(self, x: torch.Tensor, position_ids: torch.Tensor, start: int = 0,
                   end: int | None = None, cache: KVCache | None = None,
                   valid: torch.Tensor | None = None, cache_offset: int = 0,
                   checkpoint_blocks: bool = False) -> torch.Tensor:
        """Run ``blocks[start:end]`` on ``x`` [B, T, d].

        ``position_ids`` [B, T] or [T] drive RoPE (learned positions are added by
        :meth:`add_positions` at the input only). ``valid`` [B, T] marks real slots (False for
        left padding); ``cache`` appends this call's keys and values per layer, at cache layer
        ``layer + cache_offset`` (methods that reuse the blocks for several passes, e.g. a looped
        stack, give each pass its own cache layers). ``checkpoint_blocks`` keeps only each block's
        input for backward and recomputes the block there (activation checkpointing per block).
        """
        rope = None
        if self.cfg.pos == "rope":
            rope = self.rope(position_ids, max(x.shape[1], cache.capacity if cache is not None else 0))
            rope = tuple(t.to(linear_dtype(x)) for t in rope)  # float32 tables would promote q and k
        mask = attention_mask(x.shape[1], 0, valid, x.device) if (valid is not None and cache is None) else None
        for block in self.blocks[start:end]:
            if checkpoint_blocks:
                x = checkpoint(block, x, rope, cache, valid, mask, cache_offset, use_reentrant=False)
            else:
                x = block(x, rope, cache, valid, mask, cache_offset)
        return x

    def rope(self, position_ids: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin ``[B or 1, 1, T, rotary_dim]`` for ``position_ids`` [B, T] or [T], all below
        ``bound`` (a token's position never reaches the slots of its call plus the cache's capacity):
        looked up in the table of the first ``block_size`` positions when ``bound`` fits in it,
        computed on the spot otherwise. Checking ``bound``, not the ids, needs no device sync."""
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if bound <= self.rope_cos.shape[0]:
            return self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]
        return rope_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rope_theta, torch.float32)

    def add_positions(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input-side position handling: learned embeddings are added, RoPE adds nothing here."""
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        return self.drop(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and logits over the real vocabulary (padded rows are never scored). The matmul
        keeps the padded width (a multiple of 64 runs on the fast GPU kernels); the slice is a view.
        Training losses never form these logits (``model/losses.py``)."""
        return self.lm_head(self.norm_f(h))[..., : self.cfg.vocab_size]

    # --- plain language model ---------------------------------------------------------------

    def forward(self, idx: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] of an ordinary left-to-right pass (positions default to 0..T-1,
        continuing after the cache)."""
        return self.head(self.hidden(idx, inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache,
                                     valid=valid))

    def hidden(self, idx: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output [B, T, d] of :meth:`forward`, before the final norm and head
        (what ``model.losses`` trains on without materialising the logits)."""
        x = self.embed(idx) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            past = cache.lengths[0] if cache is not None else 0
            position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        x = self.add_positions(x, position_ids)
        return self.run_blocks(x, position_ids, cache=cache, valid=valid)

    def new_cache(self, batch: int, capacity: int, device=None, dtype=None, passes: int = 1) -> KVCache:
        """A cache for ``passes`` runs of the block stack (``passes * n_layer`` cache layers)."""
        p = self.lm_head.weight
        return KVCache(passes * self.cfg.n_layer, batch, self.cfg.n_kv_head, self.cfg.n_embd // self.cfg.n_head,
                       capacity, device or p.device, dtype or p.dtype)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count (tied weights once). ``embeddings=False`` drops token and position
        embeddings, the usual 'non-embedding' count."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if not embeddings:
            n -= self.wte.weight.numel() if not self.cfg.tie_embeddings else 0
            n -= self.wpe.weight.numel() if self.wpe is not None else 0
        return n
