"""TopK sparse autoencoder over a teacher's residual stream (docs/METHODS.md §2.1, §2.5).

Inputs are normalised per token before encoding: mu = mean(x), s = std(x - mu) (unbiased),
x_hat = (x - mu) / (s + 1e-5). Encoding keeps the k largest pre-activations (ReLU'd); decoding
works in normalised space and is mapped back with s and mu. Parameter names and shapes follow
the SAE-Lens layout: W_enc [d_in, C], b_enc [C], W_dec [C, d_in], b_dec [d_in].

Besides the model this module trains one on streamed teacher activations (:func:`train_sae`),
measures it (:func:`evaluate_sae`), saves and loads it in the SAE-Lens directory layout plus a
latentlm manifest (:func:`save_sae`, :func:`load_sae`), imports third-party TopK SAEs (SAE-Lens
directories without our manifest, such as the public copies of OpenAI's GPT-2 SAEs, and OpenAI
``sparse_autoencoder`` state dicts: :func:`sae_from_openai_state_dict`), reading k and the activation
from the files and refusing what is not a TopK SAE, and checks that an SAE belongs to the teacher
it is used with (:func:`check_sae_matches`). See docs/COCOMIX.md, "Sparse autoencoder".
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from latentlm.data.loader import TokenSplit, WindowLoader, iter_eval_windows
from latentlm.errors import LatentLMError
from latentlm.fileio import (ManifestFormat, fsync_file, publishing, read_json_object, sha256_file,
                             write_delay, write_json_atomic)

NORM_EPS = 1e-5
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
METRICS_FILE = "metrics.json"
MANIFEST_KIND = "latentlm-sae"
FORMAT_VERSION = 1
SAE_FORMAT = ManifestFormat(MANIFEST_KIND, FORMAT_VERSION, "a latentlm SAE directory",
                            "save the SAE again with this latentlm (`latentlm sae train` or save_sae)")
DAMAGED = "the SAE is damaged, save or download it again"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
OPENAI_KEYS = ("pre_bias", "encoder.weight", "latent_bias", "decoder.weight")
POOL_BATCHES = 8  # the shuffle pool holds this many batches of tokens


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, n_latents: int, k: int, meta: dict[str, Any] | None = None):
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k={k} must be in [1, n_latents={n_latents}]")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.W_enc = nn.Parameter(torch.empty(d_in, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.meta: dict[str, Any] = dict(meta or {})  # which teacher / layer / tokenizer it belongs to
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Unit-norm decoder rows, encoder initialised as the decoder's transpose (a common TopK
        SAE start that makes the first reconstructions sensible)."""
        nn.init.normal_(self.W_dec)
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            self.W_enc.copy_(self.W_dec.t())
        nn.init.zeros_(self.b_enc)
        nn.init.zeros_(self.b_dec)

    @staticmethod
    def normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_hat, mu, s)`` per token over the last dimension (keepdim), not detached."""
        mu = x.mean(-1, keepdim=True)
        s = (x - mu).std(-1, keepdim=True)  # unbiased, as the reference SAEs
        return (x - mu) / (s + NORM_EPS), mu, s

    def pre_activations(self, x_hat: torch.Tensor) -> torch.Tensor:
        return (x_hat - self.b_dec) @ self.W_enc + self.b_enc

    def topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values (ReLU'd) and indices of the k largest pre-activations."""
        vals, idx = pre.topk(self.k, dim=-1)
        return vals.relu(), idx

    def encode(self, x_hat: torch.Tensor) -> torch.Tensor:
        """Dense latents [..., C]: ReLU(TopK_k(pre)), zeros elsewhere."""
        vals, idx = self.topk(self.pre_activations(x_hat))
        return torch.zeros(*vals.shape[:-1], self.n_latents, dtype=vals.dtype,
                           device=vals.device).scatter_(-1, idx, vals)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Reconstruction in normalised space."""
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction in the input's space, dense latents)``."""
        x_hat, mu, s = self.normalize(x)
        latents = self.encode(x_hat)
        return self.decode(latents) * s + mu, latents  # docs/METHODS.md §2.1: x_rec = (c W_dec + b_dec) s + mu


def _dense(vals: torch.Tensor, idx: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Scatter top-k ``(vals, idx)`` into dense [..., n_latents] latents."""
    return torch.zeros(*vals.shape[:-1], n_latents, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)


def _token_chunks(activations: Iterable[torch.Tensor], d_in: int) -> Iterator[torch.Tensor]:
    """Validated float32 CPU chunks [N, d_in] (leading dimensions flattened) from a stream."""
    for chunk in activations:
        if not isinstance(chunk, torch.Tensor) or not chunk.is_floating_point() or chunk.shape[-1:] != (d_in,):
            shape = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
            raise LatentLMError(f"SAE activations must be float tensors [N, {d_in}], got {shape}; "
                                "pass the teacher's residual-stream vectors of the SAE's layer")
        chunk = chunk.detach().reshape(-1, d_in).to("cpu", torch.float32)
        if not torch.isfinite(chunk).all():
            raise LatentLMError("SAE activations contain NaN or inf; check the teacher run that produced them")
        if len(chunk):
            yield chunk


class _TokenPool:
    """Buffers up to ``capacity`` tokens of the stream and serves them in a random order, so a
    batch mixes many documents instead of consecutive tokens of one."""

    def __init__(self, chunks: Iterator[torch.Tensor], capacity: int, generator: torch.Generator):
        self.chunks, self.capacity, self.generator = chunks, capacity, generator
        self.pool: torch.Tensor | None = None
        self.pos = 0

    def next_batch(self, n: int) -> torch.Tensor | None:
        """Up to ``n`` shuffled tokens; fewer only at the end of the stream, None once it is empty."""
        left = 0 if self.pool is None else len(self.pool) - self.pos
        if left < n:
            parts = [] if self.pool is None else [self.pool[self.pos:]]
            size = left
            for chunk in self.chunks:
                parts.append(chunk)
                size += len(chunk)
                if size >= self.capacity:
                    break
            if size == 0:
                return None
            pool = torch.cat(parts)
            self.pool, self.pos = pool[torch.randperm(len(pool), generator=self.generator)], 0
        batch = self.pool[self.pos:self.pos + n]
        self.pos += len(batch)
        return batch if len(batch) else None


def _geometric_median(x: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Weiszfeld iterations from the mean: a robust centre for initialising b_dec."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-6)
        m = (w[:, None] * x).sum(0) / w.sum()
    return m


def _schedule(steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup over the first 5% of steps, linear decay to 0 over the last 20%."""
    warmup, decay = max(1, steps // 20), max(1, steps // 5)
    return lambda s: min((s + 1) / warmup, 1.0, (steps - s) / decay)


def _check_train_args(d_in: int, n_latents: int, k: int, steps: int, lr: float, batch_tokens: int,
                      aux_k: int | None, aux_coef: float, dead_tokens: int) -> None:
    if d_in < 1 or n_latents < 1 or not 0 < k <= n_latents:
        raise LatentLMError(f"SAE needs d_in >= 1, n_latents >= 1 and 1 <= k <= n_latents; "
                            f"got d_in={d_in}, n_latents={n_latents}, k={k}")
    for name, value in (("steps", steps), ("batch_tokens", batch_tokens), ("dead_tokens", dead_tokens)):
        if value < 1:
            raise LatentLMError(f"SAE training {name} must be >= 1, got {value}")
    if not lr > 0 or aux_coef < 0 or (aux_k is not None and aux_k < 1):
        raise LatentLMError(f"SAE training needs lr > 0, aux_coef >= 0 and aux_k >= 1; "
                            f"got lr={lr}, aux_coef={aux_coef}, aux_k={aux_k}")


def train_sae(activations: Iterable[torch.Tensor], d_in: int, n_latents: int, k: int, *, steps: int,
              lr: float = 4e-4, batch_tokens: int = 4096, aux_k: int | None = None, aux_coef: float = 1 / 32,
              dead_tokens: int = 1_000_000, seed: int = 0, device: str | torch.device = "cpu",
              progress: bool = True, meta: dict[str, Any] | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Train a TopK SAE on streamed teacher activations (docs/METHODS.md §2.5); return it (eval, CPU) and metrics.

    ``activations`` yields raw residual-stream vectors [N, d_in]; they pass through a shuffled pool
    of ``POOL_BATCHES * batch_tokens`` tokens. Training stops early if the stream runs out. The loss
    is the reconstruction MSE in normalised space divided by the batch's total variance (i.e. the
    batch FVU) plus ``aux_coef`` times AuxK: the top ``aux_k`` (default ``min(2k, 512)``, capped at
    the number dead) latents among those not active for ``dead_tokens`` tokens reconstruct the
    main residual, scored as the fraction of the residual's energy left. Decoder rows stay unit-norm.
    Metrics: ``fvu``, ``dead_fraction`` (not active within the last ``dead_tokens`` tokens, or ever if
    fewer were seen), ``mean_active`` (non-zero latents per token) over the last logging window,
    ``steps``, ``tokens`` and ``history`` (one entry per window).
    """
    _check_train_args(d_in, n_latents, k, steps, lr, batch_tokens, aux_k, aux_coef, dead_tokens)
    aux_k = min(2 * k, 512) if aux_k is None else aux_k
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = TopKSAE(d_in, n_latents, k, meta)
    sae.to(device).train()
    pool = _TokenPool(_token_chunks(activations, d_in), POOL_BATCHES * batch_tokens,
                      torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
    since_active = torch.zeros(n_latents, dtype=torch.long, device=device)  # tokens since each latent fired
    window = torch.zeros(5, dtype=torch.float64, device=device)  # err, total var, active, loss, aux loss
    log_every = max(1, steps // 100)
    history: list[dict[str, Any]] = []
    tokens = window_tokens = window_steps = step = 0
    bar = tqdm(total=steps, disable=not progress, unit="step", desc="sae", dynamic_ncols=True)

    def log_window() -> None:
        """Close the logging window: append its averages to ``history`` and reset it."""
        nonlocal window_tokens, window_steps
        e, t, active, loss_sum, aux_sum = window.tolist()
        dead_frac = (since_active >= min(dead_tokens, tokens)).float().mean().item()
        history.append({"step": step, "tokens": tokens, "lr": opt.param_groups[0]["lr"],
                        "loss": loss_sum / window_steps, "aux_loss": aux_sum / window_steps,
                        "fvu": e / t, "dead_fraction": dead_frac, "mean_active": active / window_tokens})
        bar.set_postfix(fvu=f"{e / t:.4f}", dead=f"{dead_frac:.3f}")
        window.zero_()
        window_tokens = window_steps = 0

    while step < steps:
        batch = pool.next_batch(batch_tokens)
        if batch is None:
            break
        x_hat = TopKSAE.normalize(batch.to(device, non_blocking=True))[0]
        if step == 0:
            with torch.no_grad():
                sae.b_dec.copy_(_geometric_median(x_hat))
        pre = sae.pre_activations(x_hat)
        vals, idx = sae.topk(pre)
        rec = sae.decode(_dense(vals, idx, n_latents))
        err = (rec - x_hat).pow(2).sum()
        total = (x_hat - x_hat.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = err / total
        aux = torch.zeros((), device=device)
        dead = since_active >= dead_tokens
        n_dead = int(dead.sum())
        if aux_coef > 0 and n_dead > 0:
            aux_vals, aux_idx = pre.masked_fill(~dead, -math.inf).topk(min(aux_k, n_dead), dim=-1)
            resid = (x_hat - rec).detach()
            aux_rec = _dense(aux_vals.relu(), aux_idx, n_latents) @ sae.W_dec
            aux = (aux_rec - resid).pow(2).sum() / resid.pow(2).sum().clamp_min(1e-12)
            loss = loss + aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w, g = sae.W_dec, sae.W_dec.grad
            g -= (g * w).sum(1, keepdim=True) * w  # keep only the part tangent to the unit sphere
            opt.step()
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            fired = torch.zeros(n_latents, dtype=torch.bool, device=device)
            fired[idx[vals > 0]] = True
            since_active += len(batch)
            since_active[fired] = 0
            window += torch.stack([err.detach(), total, (vals > 0).sum(), loss.detach(), aux.detach()]).double()
        sched.step()
        step += 1
        tokens += len(batch)
        window_tokens += len(batch)
        window_steps += 1
        if step % log_every == 0 or step == steps:
            log_window()
        bar.update(1)
    if window_steps:  # the stream ended inside a logging window
        log_window()
    bar.close()
    if step == 0:
        raise LatentLMError("the activation stream for SAE training yielded no tokens; check the corpus and teacher")
    last = history[-1]
    metrics = {"fvu": last["fvu"], "dead_fraction": last["dead_fraction"], "mean_active": last["mean_active"],
               "steps": step, "tokens": tokens, "history": history}
    return sae.eval().cpu(), metrics


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, activations: Iterable[torch.Tensor], max_tokens: int | None = None) -> dict[str, float]:
    """FVU in normalised space, fraction of latents never active and mean active latents per token,
    over up to ``max_tokens`` tokens of ``activations`` (raw vectors [N, d_in])."""
    if max_tokens is not None and max_tokens < 1:
        raise LatentLMError(f"max_tokens must be >= 1 to evaluate the SAE, got {max_tokens}")
    device = sae.W_enc.device
    err = sq = 0.0
    total = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    n = active = 0
    for chunk in _token_chunks(activations, sae.d_in):
        if max_tokens is not None:
            chunk = chunk[:max_tokens - n]
        x_hat = TopKSAE.normalize(chunk.to(device, sae.W_enc.dtype))[0]
        latents = sae.encode(x_hat)
        err += (sae.decode(latents) - x_hat).double().pow(2).sum().item()
        sq += x_hat.double().pow(2).sum().item()
        total += x_hat.double().sum(0)
        on = latents > 0
        fired |= on.any(0)
        active += int(on.sum())
        n += len(chunk)
        if max_tokens is not None and n >= max_tokens:
            break
    if n == 0:
        raise LatentLMError("no activations to evaluate the SAE on; check the corpus and teacher")
    variance = max(sq - total.pow(2).sum().item() / n, 1e-12)  # sum ||x_hat - mean||^2
    return {"fvu": err / variance, "dead_fraction": 1.0 - fired.float().mean().item(), "mean_active": active / n}


def _sae_cfg(sae: TopKSAE) -> dict[str, Any]:
    """cfg.json in SAE-Lens style; ``latentlm`` carries the SAE's meta (teacher, layer, tokenizer)."""
    return {"architecture": "topk", "d_in": sae.d_in, "d_sae": sae.n_latents, "k": sae.k,
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": sae.k}, "apply_b_dec_to_input": True,
            "normalize_activations": "layer_norm", "latentlm_normalization": "per-token mean/std (docs/METHODS.md §2.1)",
            "dtype": str(sae.W_enc.dtype).removeprefix("torch."), "latentlm": sae.meta}


def train_sae_on_teacher(teacher, data_dir: str | Path, out: str | Path, *, layer: int, latents: int, k: int,
                         steps: int, lr: float = 4e-4, batch_tokens: int = 4096, seq_len: int = 1024,
                         eval_tokens: int = 100_000, seed: int = 0, device: str | torch.device = "cpu",
                         progress: bool = True, **aux: Any) -> tuple[Path, dict[str, Any]]:
    """``latentlm sae train``: an SAE on ``teacher``'s residual stream after block ``layer`` over the
    train windows of ``data_dir`` (tokenized with the teacher's tokenizer), evaluated on its val split
    and saved to ``out``; returns the path and ``{"val": ..., "train": ...}`` metrics. ``aux`` passes
    :func:`train_sae`'s dead-latent settings (``aux_k``, ``aux_coef``, ``dead_tokens``) through."""
    train_split, val_split = TokenSplit(data_dir, "train"), TokenSplit(data_dir, "val")
    windows = max(1, min(batch_tokens // seq_len, (len(train_split) - 1) // seq_len))
    loader = WindowLoader(train_split, seq_len, windows, seed=seed)

    def stream():
        while True:  # the loader starts a new epoch whenever one is used up; train_sae stops at ``steps``
            yield teacher.hidden(loader.next_batch()[0], layer)

    meta = {"teacher": teacher.describe(), "layer": layer, "tokenizer_fingerprint": teacher.tokenizer.fingerprint()}
    sae, train_metrics = train_sae(stream(), teacher.d_model, latents, k, steps=steps, lr=lr, batch_tokens=batch_tokens,
                                   seed=seed, device=device, progress=progress, meta=meta, **aux)
    val = (teacher.hidden(x, layer) for x, _ in iter_eval_windows(val_split, seq_len, windows))
    metrics = {"val": evaluate_sae(sae.to(device), val, max_tokens=eval_tokens),
               "train": {key: v for key, v in train_metrics.items() if key != "history"}}
    return save_sae(sae.cpu(), out, metrics=metrics), metrics


def save_sae(sae: TopKSAE, directory: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``directory`` atomically: sae_weights.safetensors, cfg.json, manifest.json (sha256s) and,
    if given, ``metrics.json`` (inside the same atomic write, so a kill never leaves an SAE without it).

    An existing directory is replaced only if it is empty or a previously saved SAE."""
    out = Path(directory)
    try:
        json.dumps(sae.meta)
    except (TypeError, ValueError):
        raise LatentLMError("sae.meta must be JSON-serialisable (plain dicts, lists, strings, numbers)") from None
    with publishing(out, replace=SAE_FORMAT,
                    refusal="exists and is not a saved SAE; choose a new directory or remove it") as tmp:
        save_file({name: getattr(sae, name).detach().cpu().contiguous() for name in PARAM_NAMES},
                  str(tmp / WEIGHTS_FILE), metadata={"format": MANIFEST_KIND})
        write_delay()
        write_json_atomic(tmp / CFG_FILE, _sae_cfg(sae))
        if metrics is not None:
            write_json_atomic(tmp / METRICS_FILE, metrics)
        files = {}
        for name in (WEIGHTS_FILE, CFG_FILE):
            fsync_file(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        SAE_FORMAT.write(tmp, {"files": files})
    return out


def _load_openai_file(path: Path, k: int | None) -> TopKSAE:
    """An SAE from a .safetensors / .pt file holding an OpenAI ``sparse_autoencoder`` state dict."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as e:
        raise LatentLMError(f"cannot read SAE file {path} ({type(e).__name__}); it is damaged or not a "
                            "state dict of tensors") from None
    if not isinstance(state, Mapping):
        raise LatentLMError(f"{path} does not hold a state dict; expected OpenAI keys {', '.join(OPENAI_KEYS)}")
    return sae_from_openai_state_dict(state, k, source=str(path))


def load_sae(path: str | Path, k: int | None = None) -> TopKSAE:
    """Load an SAE (eval mode, CPU): a directory saved by :func:`save_sae` (checked against its
    manifest), a SAE-Lens directory without our manifest (cfg.json + sae_weights.safetensors, e.g. the
    public copies of OpenAI's GPT-2 SAEs), or an OpenAI-format .pt/.safetensors state dict file. k and
    the activation are read from the files (a given ``k`` must match); an SAE that is not TopK is refused."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in (".safetensors", ".pt"):
            raise LatentLMError(f"{p} is not an SAE: pass a directory written by save_sae or SAE-Lens, or an "
                                "OpenAI-format .safetensors/.pt file")
        return _load_openai_file(p, k)
    if not p.is_dir():
        raise LatentLMError(f"SAE {p} does not exist; pass a directory written by save_sae or SAE-Lens, or an "
                            "OpenAI-format file")
    if not (p / SAE_FORMAT.name).is_file():
        if (p / CFG_FILE).is_file() and (p / WEIGHTS_FILE).is_file():
            return _load_sae_lens_dir(p, k)
        raise LatentLMError(f"{p} is not an SAE directory: it has neither latentlm's {SAE_FORMAT.name} nor SAE-Lens' "
                            f"{CFG_FILE} + {WEIGHTS_FILE}")
    manifest = SAE_FORMAT.read(p)
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (p / name).is_file():
            raise LatentLMError(f"SAE directory {p} has no {name}; it is incomplete, save it again with save_sae")
    files = manifest.get("files")
    for name in (WEIGHTS_FILE, CFG_FILE):
        entry = files.get(name) if isinstance(files, dict) else None
        if not isinstance(entry, dict) or sha256_file(p / name) != entry.get("sha256"):
            raise LatentLMError(f"SAE file {p / name} does not match its manifest sha256; it is damaged, save it again")
    cfg = read_json_object(p / CFG_FILE, DAMAGED)
    if cfg.get("architecture") != "topk":
        raise LatentLMError(f"SAE {p} has architecture {cfg.get('architecture')!r}; latentlm only loads 'topk' SAEs")
    d_in, d_sae, cfg_k = cfg.get("d_in"), cfg.get("d_sae"), cfg.get("k")
    if not all(isinstance(v, int) and v > 0 for v in (d_in, d_sae, cfg_k)) or cfg_k > d_sae:
        raise LatentLMError(f"{p / CFG_FILE} needs positive integers d_in, d_sae and k <= d_sae; "
                            f"got d_in={d_in}, d_sae={d_sae}, k={cfg_k}")
    if k is not None and k != cfg_k:
        raise LatentLMError(f"SAE {p} was trained with k={cfg_k}, not k={k}; drop the k argument or use k={cfg_k}")
    try:
        state = load_file(str(p / WEIGHTS_FILE))
    except SafetensorError:
        raise LatentLMError(f"cannot read {p / WEIGHTS_FILE}; it is damaged, save the SAE again") from None
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if set(state) != set(want):
        raise LatentLMError(f"{p / WEIGHTS_FILE} holds {sorted(state)}, expected {sorted(want)}; save the SAE again")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise LatentLMError(f"{p / WEIGHTS_FILE}: {name} has shape {tuple(state[name].shape)}, cfg.json "
                                f"implies {shape}; the files do not belong together, save the SAE again")
    meta = cfg.get("latentlm")
    sae = _to_be_loaded(d_in, d_sae, cfg_k, meta if isinstance(meta, dict) else None)
    sae.load_state_dict(state)
    return sae.eval()


def _sae_lens_topk(cfg: Mapping[str, Any], p: Path) -> int:
    """k of a SAE-Lens cfg.json that describes a TopK SAE (any cfg version), else a one-line refusal.

    SAE-Lens >= 6 writes ``architecture: "topk"`` and ``k``; older versions (and the public copies of
    OpenAI's GPT-2 SAEs) ``activation_fn_str: "topk"`` (later ``activation_fn``) with
    ``activation_fn_kwargs: {"k": ...}`` and ``architecture`` "standard" or none."""
    arch = cfg.get("architecture")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    kwargs = cfg.get("activation_fn_kwargs") if isinstance(cfg.get("activation_fn_kwargs"), Mapping) else {}
    if not (arch == "topk" or (arch in (None, "standard") and act == "topk")):
        raise LatentLMError(f"SAE {p} is not a TopK SAE (architecture {arch or 'standard'!r}, activation "
                            f"{act or 'relu'!r} in its cfg.json); CoCoMix concepts need a TopK SAE")
    k = cfg.get("k", kwargs.get("k"))
    d_sae = cfg.get("d_sae")
    if not (isinstance(k, int) and not isinstance(k, bool) and isinstance(d_sae, int) and 0 < k <= d_sae):
        raise LatentLMError(f"{p / CFG_FILE} describes a TopK SAE but gives no valid k (k={k!r}, d_sae={d_sae!r}); "
                            "set k (activation_fn_kwargs.k) in it")
    return k


# SAE-Lens hook names of the residual stream around a block, as the teacher block whose output they read.
_HOOKS = {"hook_resid_post": 0, "hook_resid_pre": -1}


def _sae_lens_layer(cfg: Mapping[str, Any], p: Path) -> int | None:
    """The teacher block whose output the SAE reads, from its hook name (None when not recorded)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), Mapping) else {}
    hook = cfg.get("hook_name", cfg.get("hook_point", meta.get("hook_name")))
    if not isinstance(hook, str):
        return None
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)", hook)
    if m is None or m.group(2) not in _HOOKS or int(m.group(1)) + _HOOKS[m.group(2)] < 0:
        raise LatentLMError(f"SAE {p} reads {hook!r}; latentlm's teachers expose the residual stream after a "
                            "block (blocks.N.hook_resid_post), so use an SAE trained there")
    return int(m.group(1)) + _HOOKS[m.group(2)]


def _load_sae_lens_dir(p: Path, k: int | None) -> TopKSAE:
    """A third-party SAE-Lens directory (cfg.json + sae_weights.safetensors, no latentlm manifest)."""
    hint = "it is not a readable SAE-Lens directory"
    cfg = read_json_object(p / CFG_FILE, hint)
    cfg_k = _sae_lens_topk(cfg, p)
    if k is not None and k != cfg_k:
        raise LatentLMError(f"SAE {p} has k={cfg_k} in its cfg.json, not k={k}; drop the k argument or use k={cfg_k}")
    norm = cfg.get("normalize_activations")
    if norm != "layer_norm":
        raise LatentLMError(f"SAE {p} normalizes its inputs with {norm!r}; latentlm's SAEs and concept heads "
                            "normalize each token by its mean and std (SAE-Lens 'layer_norm'), so use such an SAE")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise LatentLMError(f"SAE {p} ranks latents by pre-activation x decoder norm "
                            "(rescale_acts_by_decoder_norm); latentlm's TopK ranks raw pre-activations")
    try:
        state = load_file(str(p / WEIGHTS_FILE))
    except SafetensorError:
        raise LatentLMError(f"cannot read {p / WEIGHTS_FILE}; {hint}") from None
    missing = [n for n in PARAM_NAMES if n not in state]
    extra = [n for n in state if n not in PARAM_NAMES and not (n == "scaling_factor" and bool((state[n] == 1).all()))]
    if missing or extra:
        raise LatentLMError(f"{p / WEIGHTS_FILE} holds {sorted(state)}; a SAE-Lens TopK SAE has exactly "
                            f"{', '.join(PARAM_NAMES)} (a scaling_factor of ones is ignored)")
    d_in, d_sae = state["W_enc"].shape if state["W_enc"].dim() == 2 else (0, 0)
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    bad = [f"{n} {tuple(state[n].shape)}" for n, shape in want.items() if tuple(state[n].shape) != shape]
    if bad or (cfg.get("d_in"), cfg.get("d_sae")) != (d_in, d_sae) or cfg_k > d_sae:
        raise LatentLMError(f"{p / WEIGHTS_FILE} has {', '.join(bad) or 'W_enc ' + str((d_in, d_sae))}, not the "
                            f"shapes of cfg.json's d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')}; the files do not "
                            "belong together")
    state = {n: state[n].to(torch.float32) for n in PARAM_NAMES}
    if cfg.get("apply_b_dec_to_input", True) is False:
        # pre = x W_enc + b_enc equals ours, (x - b_dec) W_enc + b_enc', with b_enc' = b_enc + b_dec W_enc.
        state["b_enc"] = state["b_enc"] + state["b_dec"].double() @ state["W_enc"].double()
        state["b_enc"] = state["b_enc"].float()
    meta: dict[str, Any] = {"imported": {"format": "sae-lens", "path": str(p.resolve())}}
    layer = _sae_lens_layer(cfg, p)
    if layer is not None:
        meta["layer"] = layer
    sae = _to_be_loaded(d_in, d_sae, cfg_k, meta)
    sae.load_state_dict(state)
    return sae.eval()


def _to_be_loaded(d_in: int, n_latents: int, k: int, meta: dict[str, Any] | None = None) -> TopKSAE:
    """An SAE whose weights are about to be overwritten: its throw-away init draws from a forked RNG,
    so loading an SAE never shifts a caller's seeded stream (e.g. a student's initial weights)."""
    with torch.random.fork_rng(devices=[]):
        return TopKSAE(d_in, n_latents, k, meta)


def _openai_k(state_dict: Mapping[str, Any], k: int | None, source: str) -> int:
    """k of an OpenAI state dict: recorded by ``Autoencoder.state_dict()`` as ``activation: "TopK"`` and
    ``activation_state_dict: {"k": ..., "postact_fn": "ReLU"}``; anything else recorded is refused (OpenAI's
    loader reads such an SAE with that activation and no input normalisation). A file of tensors alone
    (e.g. .safetensors) records nothing: ``k`` must be given, vouching that it is TopK."""
    activation = state_dict.get("activation")
    if activation is None:
        if k is None:
            raise LatentLMError(f"{source} records no activation (only tensors); pass k if it is a TopK SAE")
        return k
    if activation != "TopK":
        raise LatentLMError(f"{source} is an OpenAI SAE with activation {activation!r}, not 'TopK'; CoCoMix concepts "
                            "need a TopK SAE")
    act = state_dict.get("activation_state_dict")
    act = act if isinstance(act, Mapping) else {}
    file_k, post = act.get("k"), act.get("postact_fn", "ReLU")
    if post != "ReLU":
        raise LatentLMError(f"{source} applies {post!r} after its TopK; latentlm's TopK SAEs apply ReLU")
    if not isinstance(file_k, int) or isinstance(file_k, bool):
        if k is None:
            raise LatentLMError(f"{source} is a TopK SAE but records no k (activation_state_dict.k); pass k")
        return k
    if k is not None and k != file_k:
        raise LatentLMError(f"{source} records k={file_k}, not k={k}; drop the k argument or use k={file_k}")
    return file_k


def sae_from_openai_state_dict(state_dict: Mapping[str, Any], k: int | None = None, *,
                               source: str = "the OpenAI state dict") -> TopKSAE:
    """A TopKSAE from an OpenAI ``sparse_autoencoder`` state dict (pre_bias [d], encoder.weight [C, d],
    latent_bias [C], decoder.weight [d, C]): pre_bias is b_dec, latent_bias b_enc, weights transposed.
    k comes from the recorded activation (``TopK`` with its ``k``; another activation is refused) or,
    for tensors alone, from ``k``. Other keys (e.g. ``stats_last_nonzero``) are ignored; the result
    has no meta."""
    k = _openai_k(state_dict, k, source)
    missing = [key for key in OPENAI_KEYS if not isinstance(state_dict.get(key), torch.Tensor)]
    if missing:
        raise LatentLMError(f"not an OpenAI sparse_autoencoder state dict: missing tensors {', '.join(missing)}")
    enc = state_dict["encoder.weight"]
    if enc.dim() != 2:
        raise LatentLMError(f"OpenAI SAE encoder.weight must be 2-D [n_latents, d_in], got {tuple(enc.shape)}")
    n_latents, d_in = enc.shape
    want = {"pre_bias": (d_in,), "latent_bias": (n_latents,), "decoder.weight": (d_in, n_latents)}
    for key, shape in want.items():
        if tuple(state_dict[key].shape) != shape:
            raise LatentLMError(f"OpenAI SAE {key} has shape {tuple(state_dict[key].shape)}, expected {shape} "
                                f"from encoder.weight {tuple(enc.shape)}; the state dict is inconsistent")
    if not 0 < k <= n_latents:
        raise LatentLMError(f"k={k} must be in [1, {n_latents}] for this OpenAI SAE")
    sae = _to_be_loaded(d_in, n_latents, k)
    with torch.no_grad():  # copy_ casts (a bf16 / fp16 file) to the SAE's float32
        sae.W_enc.copy_(enc.t())
        sae.b_enc.copy_(state_dict["latent_bias"])
        sae.W_dec.copy_(state_dict["decoder.weight"].t())
        sae.b_dec.copy_(state_dict["pre_bias"])
    return sae.eval()


def _teacher_identity(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first identity key (fingerprint, path, name) both teacher descriptions have, with both values."""
    for key in ("fingerprint", "path", "name"):
        if key in recorded and key in given:
            return key, recorded[key], given[key]
    return None


def check_sae_matches(sae: TopKSAE, teacher_describe: Mapping[str, Any], layer: int,
                      tokenizer_fingerprint: str | None) -> None:
    """Raise LatentLMError if ``sae.meta`` records another teacher, layer or tokenizer than given.

    Meta keys: ``teacher`` (the teacher's describe() dict, compared on fingerprint, else path,
    else name), ``layer`` and ``tokenizer_fingerprint``. Keys the meta lacks are not checked, so
    SAEs without meta (e.g. imported OpenAI files) always pass; a None fingerprint skips that check.
    """
    meta = sae.meta
    recorded = meta.get("teacher")
    if isinstance(recorded, Mapping):
        ident = _teacher_identity(recorded, teacher_describe)
        if ident is None:
            raise LatentLMError(f"cannot tell whether the SAE's teacher {dict(recorded)} is this teacher: neither "
                                "records a shared fingerprint, path or name; retrain the SAE on this teacher")
        key, want, got = ident
        if want != got:
            raise LatentLMError(f"SAE was trained on teacher {key} {str(want)[:64]!r}, not {str(got)[:64]!r}; "
                                "use an SAE trained on this teacher or retrain it")
    if "layer" in meta and meta["layer"] != layer:
        raise LatentLMError(f"SAE was trained on teacher layer {meta['layer']}, not {layer}; "
                            f"set the concept layer to {meta['layer']} or retrain the SAE")
    recorded_tok = meta.get("tokenizer_fingerprint")
    if recorded_tok is not None and tokenizer_fingerprint is not None and recorded_tok != tokenizer_fingerprint:
        raise LatentLMError(f"SAE was trained with tokenizer {str(recorded_tok)[:12]}, not "
                            f"{tokenizer_fingerprint[:12]}; use the teacher's tokenizer or retrain the SAE")
