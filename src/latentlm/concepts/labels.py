"""Where a CoCoMix student's concept labels come from during training.

A label source maps a batch (tokens ``x`` [B, T] and the loader's window ids) to labels
[B, T, k_attr] (int64, -1 = masked). On the fly: the frozen teacher and its SAE compute
attribution labels for the batch (docs/METHODS.md §2.1). Labels depend only on the token window, so they
can also be precomputed once into a cache (``latentlm concepts label``, :func:`build_label_cache`) and
looked up by window (:class:`CachedLabels`); :func:`label_source` picks one for a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
from tqdm import tqdm

from latentlm.checkpoint_files import resolve_checkpoint
from latentlm.concepts.attribution import concept_labels
from latentlm.concepts.sae import PARAM_NAMES, TopKSAE, check_sae_matches, load_sae
from latentlm.concepts.teacher import Teacher, dtype_name, load_teacher, teacher_dtype
from latentlm.data.loader import TokenSplit, iter_windows
from latentlm.data.prepare import check_tokenizer, load_manifest
from latentlm.data.tokenizers import smollm2_gguf
from latentlm.errors import LatentLMError
from latentlm.fileio import ManifestFormat, publishing, sha256_file, write_delay
from latentlm.settings import Settings, setting

if TYPE_CHECKING:
    from latentlm.config import Config


@dataclasses.dataclass
class ConceptSettings(Settings):
    """The ``concepts:`` config section: where a student's concept labels come from (a teacher's SAE
    and an optional label cache) and how they are selected. A reusable block: every method that
    trains on concept labels declares this section (docs/METHODS.md §2.1)."""

    sae: str = setting("", "SAE directory written by `latentlm sae train`")
    layer: int = setting(5, "the teacher block whose output the SAE reads (0-based)")
    labels: str = setting("", "label cache from `latentlm concepts label`; empty = compute on the fly")
    k_attr: int = setting(4, "concept labels per token")
    acts: Literal["post", "pre"] = setting("post", "attribution x post-TopK latents (official) or pre-activations")
    select: Literal["attribution", "activation"] = setting("attribution", "rank latents by attribution, or by "
                                                           "activation (the ablation)")
    score: Literal["official", "eq1"] = setting("official", "attribution gradient: official = the authors' code "
                                                "(summed all-position loss at the teacher's hidden state); eq1 = the "
                                                "paper's Eq. (1) (each position's own next-token loss at the SAE "
                                                "reconstruction; the paper's full form is eq1 with acts=pre)")
    last_position: Literal["mask", "extra_token"] = setting("mask", "the last position: mask = no labels; extra_token "
                                                            "= its next token is the loader's extra one (real labels)")
    section, positive_fields, non_negative_fields = "concepts", ("k_attr",), ("layer",)


class LabelSource(Protocol):
    n_latents: int  # C and k of the SAE the labels index
    k: int

    def labels(self, x: torch.Tensor, windows: np.ndarray, y: torch.Tensor | None = None) -> torch.Tensor: ...


class OnTheFlyLabels:
    """Attribution labels computed by the teacher + SAE for every batch."""

    def __init__(self, cfg: Config, device: torch.device | str):
        c = cfg.concepts
        if not cfg.teacher.path or not c.sae:
            raise LatentLMError(f"train.method {cfg.train.method} needs --teacher.path and --concepts.sae "
                                "(or a --concepts.labels cache)")
        self.teacher = load_teacher(cfg.teacher.path, device=device, dtype=cfg.teacher.dtype)
        # The teacher reads the training tokens as they are: its tokenizer must be the data's.
        check_tokenizer(load_manifest(cfg.data.path), self.teacher.tokenizer)
        self.sae = load_sae(c.sae).to(device)
        check_sae_matches(self.sae, self.teacher.describe(), c.layer, self.teacher.tokenizer.fingerprint())
        self.cfg = c
        self.n_latents, self.k = self.sae.n_latents, self.sae.k

    def labels(self, x: torch.Tensor, windows: np.ndarray, y: torch.Tensor | None = None) -> torch.Tensor:
        """Labels of the batch ``x``; ``y`` (its next tokens) labels the last position with
        ``concepts.last_position extra_token``."""
        c = self.cfg
        targets = None
        if c.last_position == "extra_token":
            if y is None:
                raise LatentLMError("concepts.last_position=extra_token needs the batch's next tokens y")
            targets = y
        return concept_labels(self.teacher, self.sae, x, c.layer, k_attr=c.k_attr, acts=c.acts, select=c.select,
                              score=c.score, targets=targets)


class TeacherHidden:
    """The targets of the hidden-state ablation (``cocomix.concept_target hidden_*``, the paper's Fig. 6b):
    the teacher's residual stream after block ``concepts.layer``, normalised per token like an SAE's
    input (mean 0, std 1), read on the fly for every batch (no SAE, no cache)."""

    def __init__(self, cfg: Config, device: torch.device | str, width: int, who: str):
        """``who`` names the setting that asks for hidden-state targets, in errors."""
        if not cfg.teacher.path:
            raise LatentLMError(f"{who} needs --teacher.path")
        if cfg.concepts.labels:
            raise LatentLMError(f"{who} reads the teacher's hidden states on the fly; drop --concepts.labels (a "
                                "cache of concept labels)")
        self.teacher = load_teacher(cfg.teacher.path, device=device, dtype=cfg.teacher.dtype)
        check_tokenizer(load_manifest(cfg.data.path), self.teacher.tokenizer)
        if self.teacher.d_model != width:
            raise LatentLMError(f"{who}: the head is {width} wide but the teacher's hidden state has width "
                                f"{self.teacher.d_model}; drop --cocomix.n_concepts (it is taken from the teacher)")
        self.layer = cfg.concepts.layer

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [B, T, d_teacher]: the normalised hidden states of the batch ``x``."""
        return TopKSAE.normalize(self.teacher.hidden(x, self.layer))[0].to(x.device)


# --------------------------------------------------------------------------------------------
# The on-disk label cache

CACHE_KIND = "latentlm-concept-labels"
# Version 2 may label only some windows (``windows.bin``); version 1 labelled windows 0..n-1.
CACHE_FORMAT_VERSION = 2
LABELS_FILE = "labels.bin"
WINDOWS_FILE = "windows.bin"
WINDOWS_DTYPE = np.dtype("<i8")
MANIFEST_FILE = "manifest.json"
LABELS_DTYPE = np.dtype("<i4")
RERUN = "re-run `latentlm concepts label` for this run"
CACHE_FORMAT = ManifestFormat(CACHE_KIND, CACHE_FORMAT_VERSION, "a label cache", RERUN, also_reads=(1,))


def sae_fingerprint(sae: TopKSAE) -> str:
    """sha256 of an SAE's k and float32 weights: identical for an SAE and its saved copy."""
    h = hashlib.sha256(f"topk k={sae.k}\0".encode())
    for name in PARAM_NAMES:
        h.update(name.encode())
        h.update(getattr(sae, name).detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _data_identity(data_dir: str | Path) -> dict[str, Any]:
    """The training split a cache indexes: the data manifest's sha256 and the split's size."""
    split = TokenSplit(data_dir, "train")
    return {"path": str(Path(data_dir).resolve()), "manifest_sha256": sha256_file(Path(data_dir) / MANIFEST_FILE),
            "split": "train", "tokens": len(split)}


def build_label_cache(data_dir: str | Path, teacher: Teacher, sae: TopKSAE, out_dir: str | Path, *, seq_len: int,
                      layer: int, k_attr: int = 4, acts: Literal["post", "pre"] = "post",
                      select: Literal["attribution", "activation"] = "attribution",
                      score: Literal["official", "eq1"] = "official",
                      last_position: Literal["mask", "extra_token"] = "mask", batch_size: int = 8,
                      limit_windows: int | None = None, windows: np.ndarray | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Write the concept labels of every training window of ``data_dir`` to ``out_dir``; return its manifest.

    Window ``i`` is tokens ``[i * seq_len, i * seq_len + seq_len + 1)`` of the train split, as
    :class:`~latentlm.data.loader.WindowLoader` cuts it; its labels are those of its first
    ``seq_len`` tokens (the student's input ``x``; with ``last_position="extra_token"`` the window's
    last token is the last position's target). ``labels.bin`` is int32 little-endian
    [n_windows, seq_len, k_attr] (-1 masked), written batch by batch into a temporary sibling
    that is renamed into place only when complete. ``limit_windows`` keeps only the first N;
    ``windows`` (window ids, e.g. :meth:`~latentlm.data.loader.WindowLoader.upcoming_windows` of the
    runs that will read the cache) only those: row ``r`` of ``labels.bin`` is then window
    ``windows.bin[r]`` (int64, sorted). Each window's labels are the same either way. The manifest
    records the options and the teacher's compute dtype (``teacher_dtype``).
    """
    if last_position not in ("mask", "extra_token"):
        raise LatentLMError(f"last_position must be 'mask' or 'extra_token', got {last_position!r}")
    out = Path(out_dir)
    if seq_len < 1 or batch_size < 1 or (limit_windows is not None and limit_windows < 1):
        raise LatentLMError(f"seq_len, batch_size and limit_windows must be >= 1; got {seq_len}, {batch_size}, "
                            f"{limit_windows}")
    check_tokenizer(load_manifest(data_dir), teacher.tokenizer)
    check_sae_matches(sae, teacher.describe(), layer, teacher.tokenizer.fingerprint())
    split = TokenSplit(data_dir, "train")
    split_windows = (len(split) - 1) // seq_len
    n = split_windows if limit_windows is None else min(split_windows, limit_windows)
    if n == 0:
        raise LatentLMError(f"the train split of {data_dir} has {len(split)} tokens, fewer than one window of "
                            f"{seq_len + 1}; lower --seq-len or prepare more data")
    if windows is not None:
        if limit_windows is not None:
            raise LatentLMError("give limit_windows or windows, not both")
        ids = np.unique(np.asarray(windows, dtype=np.int64))
        if not len(ids) or ids[0] < 0 or ids[-1] >= split_windows:
            raise LatentLMError(f"windows must be a non-empty set of ids in [0, {split_windows}), the train split's "
                                f"windows of {seq_len} + 1 tokens")
        n = len(ids)
    else:
        ids = np.arange(n, dtype=np.int64)
    sae = sae.to(teacher.device)
    with publishing(out, replace=CACHE_FORMAT,
                    refusal="exists and is not a label cache; choose a new directory or remove it") as tmp:
        bar = tqdm(total=n, disable=not progress, unit="window", desc="labels", dynamic_ncols=True)
        with open(tmp / LABELS_FILE, "wb") as f:
            for x, y in iter_windows(split, seq_len, batch_size, ids):
                labels = concept_labels(teacher, sae, x, layer, k_attr=k_attr, acts=acts, select=select, score=score,
                                        targets=y if last_position == "extra_token" else None)
                f.write(labels.cpu().numpy().astype(LABELS_DTYPE).tobytes())
                bar.update(len(x))
            f.flush()
            os.fsync(f.fileno())
        bar.close()
        subset = {}
        if windows is not None:
            (tmp / WINDOWS_FILE).write_bytes(ids.astype(WINDOWS_DTYPE).tobytes())
            subset = {"windows": {"file": WINDOWS_FILE, "dtype": "int64", "byteorder": "little", "count": n,
                                  "sha256": sha256_file(tmp / WINDOWS_FILE)}}
        write_delay()
        manifest = CACHE_FORMAT.write(tmp, {**subset,
            "data": _data_identity(data_dir), "seq_len": seq_len, "n_windows": n, "split_windows": split_windows,
            "teacher": teacher.describe(), "layer": layer,
            "sae": {"fingerprint": sae_fingerprint(sae), "n_latents": sae.n_latents, "k": sae.k, "meta": sae.meta},
            "k_attr": k_attr, "acts": acts, "select": select, "score": score, "last_position": last_position,
            "teacher_dtype": teacher.dtype_name,
            "labels": {"file": LABELS_FILE, "dtype": "int32", "byteorder": "little", "shape": [n, seq_len, k_attr],
                       "bytes": (tmp / LABELS_FILE).stat().st_size, "sha256": sha256_file(tmp / LABELS_FILE)},
        })
    return manifest


def _teacher_spec_matches(spec: str, recorded: dict[str, Any]) -> bool:
    """Whether teacher ``spec`` is the recorded teacher, without loading it: a latentlm checkpoint by
    its fingerprint (sha256 of its manifest), any other teacher by its resolved path."""
    p = Path(spec)
    if recorded.get("kind") == "latentlm":
        if not ((p / MANIFEST_FILE).is_file() or (p / "checkpoints").is_dir()):
            return False
        return sha256_file(resolve_checkpoint(p) / MANIFEST_FILE) == recorded.get("fingerprint")
    path = smollm2_gguf() if spec == "smollm2" else p
    return path.resolve() == Path(str(recorded.get("path"))).resolve()


# What CachedLabels reads from a cache manifest, with its type (a hand-edited manifest fails in one line).
_FIELDS = {("data", "manifest_sha256"): str, ("seq_len",): int, ("k_attr",): int, ("acts",): str, ("select",): str,
           ("layer",): int, ("teacher",): dict, ("sae", "fingerprint"): str, ("sae", "n_latents"): int,
           ("sae", "k"): int, ("labels", "file"): str, ("labels", "shape"): list, ("labels", "sha256"): str}


# Recorded since the settings existed; a cache without them was built as these say (latentlm before them
# knew no other), except the teacher dtype, which the loader settles (:meth:`CachedLabels._check_dtype`).
_LEGACY = {"score": "official", "last_position": "mask"}


def _check_fields(m: dict[str, Any], path: Path) -> None:
    for key in (*_LEGACY, "teacher_dtype"):
        if key in m and not isinstance(m[key], str):
            raise LatentLMError(f"{path} is damaged: {key} is {repr(m[key])[:40]}, not a valid str; {RERUN}")
    for keys, kind in _FIELDS.items():
        value: Any = m
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if ok and keys == ("labels", "shape"):
            ok = len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        if not ok:
            raise LatentLMError(f"{path} is damaged: {'.'.join(keys)} is {repr(value)[:40]}, not a valid "
                                f"{kind.__name__}; {RERUN}")


class CachedLabels:
    """Labels looked up by window id in a cache written by :func:`build_label_cache` (memory-mapped).

    Opening checks that the cache belongs to this run: the data (manifest sha256), ``seq_len``,
    ``k_attr``, ``acts``, ``select``, ``score``, ``last_position``, ``teacher_layer``, the teacher's
    compute dtype (``teacher.dtype`` on ``device``) and, when the config names them, the teacher and
    the SAE. ``verify="sha256"`` also checksums labels.bin (slow for large caches).
    """

    def __init__(self, cache_dir: str | Path, cfg: Config, data_dir: str | Path, seq_len: int, *,
                 verify: Literal["size", "sha256"] = "size", device: torch.device | str = "cpu"):
        self.dir = Path(cache_dir)
        self.manifest = m = CACHE_FORMAT.read(self.dir)
        _check_fields(m, self.dir / MANIFEST_FILE)
        c = cfg.concepts
        data = _data_identity(data_dir)
        checks = [("data manifest sha256", m["data"]["manifest_sha256"], data["manifest_sha256"]),
                  ("seq_len", m["seq_len"], seq_len), ("k_attr", m["k_attr"], c.k_attr), ("acts", m["acts"], c.acts),
                  ("select", m["select"], c.select), ("teacher layer", m["layer"], c.layer),
                  *((key, m.get(key, old), getattr(c, key)) for key, old in _LEGACY.items())]
        for name, cached, run in checks:
            if cached != run:
                raise LatentLMError(f"label cache {self.dir} was built with {name} {str(cached)[:16]}, this run uses "
                                    f"{str(run)[:16]}; {RERUN}")
        self._check_dtype(m, cfg.teacher.dtype, device)
        teacher = cfg.teacher.path
        if teacher and not _teacher_spec_matches(teacher, m["teacher"]):
            raise LatentLMError(f"label cache {self.dir} was built with teacher {m['teacher'].get('path')}, not "
                                f"{teacher}; {RERUN}")
        if c.sae and sae_fingerprint(load_sae(c.sae)) != m["sae"]["fingerprint"]:
            raise LatentLMError(f"label cache {self.dir} was built with another SAE than {c.sae}; {RERUN}")
        info = m["labels"]
        file = self.dir / info["file"]
        n, t, k = info["shape"]
        if not file.is_file() or file.stat().st_size != n * t * k * LABELS_DTYPE.itemsize:
            raise LatentLMError(f"{file} is missing or has the wrong size for shape {info['shape']}; {RERUN}")
        if verify == "sha256" and sha256_file(file) != info["sha256"]:
            raise LatentLMError(f"{file} does not match its sha256 in the manifest (corrupted); {RERUN}")
        self.n_windows, self.seq_len, self.k_attr = n, t, k
        self.n_latents, self.k = int(m["sae"]["n_latents"]), int(m["sae"]["k"])
        self._labels = np.memmap(file, dtype=LABELS_DTYPE, mode="r", shape=(n, t, k))
        self.windows = self._read_windows(m, n, verify) if "windows" in m else None

    def _read_windows(self, m: dict[str, Any], n: int, verify: str) -> np.ndarray:
        """The window id of each row (a cache of only some windows), checked: n sorted distinct ids."""
        info = m["windows"]
        file = self.dir / str(info.get("file", "")) if isinstance(info, dict) else self.dir / WINDOWS_FILE
        if not isinstance(info, dict) or not file.is_file() or file.stat().st_size != n * WINDOWS_DTYPE.itemsize:
            raise LatentLMError(f"{file} is missing or does not hold the {n} window ids of the labels; {RERUN}")
        if verify == "sha256" and sha256_file(file) != info.get("sha256"):
            raise LatentLMError(f"{file} does not match its sha256 in the manifest (corrupted); {RERUN}")
        ids = np.fromfile(file, dtype=WINDOWS_DTYPE).astype(np.int64)
        if n and (ids[0] < 0 or (np.diff(ids) <= 0).any()):
            raise LatentLMError(f"{file} is damaged: its window ids are not sorted and distinct; {RERUN}")
        return ids

    def covers(self, windows: np.ndarray) -> np.ndarray:
        """Which of ``windows`` (ids) this cache labels (bool, same shape)."""
        windows = np.asarray(windows, dtype=np.int64)
        if self.windows is None:
            return (windows >= 0) & (windows < self.n_windows)
        return np.isin(windows, self.windows)

    def _check_dtype(self, m: dict[str, Any], setting: str, device: torch.device | str) -> None:
        """The teacher dtype the cache was built with must be the run's. A cache from before the dtype was
        recorded is taken as float32 (what latentlm then used on the CPU, and every cache had been built
        there); a run configured before the setting existed (``auto``) checks nothing, as then."""
        recorded = m.get("teacher_dtype")
        if recorded is None and setting == "auto":
            return
        recorded = recorded or "float32"
        run = dtype_name(teacher_dtype(setting, device))
        if recorded != run:
            raise LatentLMError(f"label cache {self.dir} was built with a {recorded} teacher, this run's teacher.dtype "
                                f"is {run}; pass --teacher.dtype {recorded}, or re-run `latentlm concepts label` with "
                                f"--teacher-dtype {run}")

    def labels(self, x: torch.Tensor, windows: np.ndarray, y: torch.Tensor | None = None) -> torch.Tensor:
        """int64 [B, T, k_attr] labels of the windows ``windows`` (the loader's ids), on ``x``'s device
        (``y`` is not needed: the cache was built from the windows' tokens, the extra one included)."""
        windows = np.asarray(windows, dtype=np.int64)
        if x.shape != (len(windows), self.seq_len):
            raise LatentLMError(f"batch {tuple(x.shape)} does not fit label cache {self.dir}: expected "
                                f"[{len(windows)}, {self.seq_len}]")
        rows = windows
        if self.windows is not None:  # a cache of some windows: find each one's row
            rows = np.minimum(np.searchsorted(self.windows, windows), max(self.n_windows - 1, 0))
            missing = windows[self.windows[rows] != windows] if len(windows) else windows
            if len(missing):
                raise LatentLMError(f"window {int(missing[0])} is not in label cache {self.dir}, which labels only the "
                                    f"{self.n_windows} windows its runs were to read (a longer budget or other seeds "
                                    f"read others); {RERUN} on the whole split")
        elif len(windows) and (windows.min() < 0 or windows.max() >= self.n_windows):
            raise LatentLMError(f"window {int(windows.max())} is outside the {self.n_windows} windows of label cache "
                                f"{self.dir} (built with --limit-windows?); {RERUN} on the whole split")
        labels = torch.from_numpy(self._labels[rows])
        if x.device.type == "cuda":  # pinned: an asynchronous copy, no stall of the training step
            labels = labels.pin_memory()
        return labels.to(x.device, non_blocking=True).long()


def label_source(cfg: Config, device: torch.device | str) -> LabelSource:
    """The run's label source, checked against the run: the cache ``concepts.labels`` if set, else
    teacher + SAE on the fly. Either has ``n_latents`` and ``k``, the sizes of the SAE its labels index."""
    if cfg.concepts.labels:
        if cfg.data.shift_windows:
            raise LatentLMError("data.shift_windows moves every window by a random offset each epoch, but a label "
                                "cache holds the labels of fixed windows; drop --concepts.labels (labels on the fly) "
                                "or set --data.shift_windows false")
        return CachedLabels(cfg.concepts.labels, cfg, cfg.data.path, cfg.seq_len, verify=cfg.data.verify,
                            device=device)
    return OnTheFlyLabels(cfg, device)
