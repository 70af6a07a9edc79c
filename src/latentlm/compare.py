"""``latentlm compare EXPERIMENT.yaml``: several methods trained on the same data order and budget,
evaluated the same way, reported side by side.

An experiment file names the data (a prepared directory, or a corpus to tokenize), a base config
shared by every run, a budget (equal training tokens, or equal training FLOPs counting the
teacher), the shared CoCoMix/KD artifacts to build once (a teacher, its SAE, a label cache), the
runs (method + overrides) and the evaluation (held-out tokens, zero-shot tasks). Every stage
writes its output atomically and is skipped when already complete, so an interrupted comparison
resumes where it stopped (an unfinished run continues from its latest checkpoint). With
``seeds`` each run is trained once per seed (``train.seed``: initial weights and data order) and
the report gives mean +- std over seeds and paired differences to a ``baseline`` run
(:mod:`latentlm.report_seeds`). See docs/COMPARE.md for the file format.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from latentlm.concepts.labels import CachedLabels, build_label_cache
from latentlm.concepts.sae import load_sae, train_sae_on_teacher
from latentlm.concepts.teacher import load_teacher
from latentlm.config import config_differences, config_from_dict, make_config
from latentlm.data.loader import TokenSplit, WindowLoader
from latentlm.data.prepare import load_manifest, prepare
from latentlm.data.sources import iter_documents
from latentlm.data.tokenizers import load_tokenizer, train_bpe
from latentlm.devices import resolve_device
from latentlm.errors import Interrupted, LatentLMError
from latentlm.eval.perplexity import evaluate_text, evaluate_tokens
from latentlm.eval.zeroshot import PREFIXES, evaluate_tasks, resolve_prefix
from latentlm.fileio import write_json_atomic, write_text_atomic
from latentlm.loading import checkpoint_tokenizer, load_method
from latentlm.methods import BASELINE, flops_report, method_class, section_types
from latentlm.report import run_summary, write_report
from latentlm.report_seeds import write_seeded_report
from latentlm.settings import check_seed, read_yaml, short_repr
from latentlm.checkpoint_files import latest_checkpoint
from latentlm.train.trainer import train

TOP_KEYS = {"name", "out_dir", "data", "base", "budget", "teacher", "sae", "labels", "eval", "runs", "seeds",
            "baseline", "report"}
DATA_KEYS = {"path", "source", "tokenizer", "tokenizer_path", "vocab_size", "val_fraction", "limit"}
SAE_KEYS = {"layer", "latents", "k", "steps", "lr", "batch_tokens", "eval_tokens", "aux_k", "aux_coef", "dead_tokens",
            "path", "max_dead"}
EVAL_KEYS = {"tokens", "points", "tasks", "limit", "batch_size", "prefix", "texts", "text_tokens"}
RUN_KEYS = {"method", "config", "overrides", "seeds"}


def _check_keys(where: str, d: Any, allowed: set[str]) -> dict:
    if not isinstance(d, dict):
        raise LatentLMError(f"{where} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise LatentLMError(f"unknown key {where}.{unknown[0]}; allowed: {', '.join(sorted(allowed))}")
    return d


def load_experiment(path: str | Path) -> dict[str, Any]:
    """Read and check an experiment file; relative paths in it are relative to the working directory."""
    p = Path(path)
    if not p.is_file():
        raise LatentLMError(f"experiment file {p} does not exist")
    exp = read_yaml(p, "experiment file", floats=False)
    _check_keys("experiment", exp, TOP_KEYS)
    for key in ("out_dir", "data", "budget", "runs"):
        if key not in exp:
            raise LatentLMError(f"{p} needs a {key!r} entry (see docs/COMPARE.md)")
    data = _check_keys("data", exp["data"], DATA_KEYS)
    if ("path" in data) == ("source" in data):
        raise LatentLMError("data needs exactly one of 'path' (a prepared directory) or 'source' (a corpus to prepare)")
    if not isinstance(exp["out_dir"], str) or not exp["out_dir"]:
        raise LatentLMError(f"out_dir={short_repr(exp['out_dir'])} in {p} must be a directory path (a string)")
    budget = _check_keys("budget", exp["budget"], {"tokens", "flops"})
    amount = next(iter(budget.values()), None)
    if len(budget) != 1 or isinstance(amount, bool) or not isinstance(amount, (int, float)) \
            or not (0 < amount < math.inf):
        raise LatentLMError("budget needs exactly one positive number (finite): 'tokens' (equal training tokens) or "
                            "'flops' (equal training FLOPs, teacher included)")
    runs = _check_keys("runs", exp["runs"], set(exp["runs"]) if isinstance(exp["runs"], dict) else set())
    if not runs:
        raise LatentLMError("runs is empty; name at least one run, e.g. runs: {ntp: {method: ntp}}")
    for name, run in runs.items():
        _check_keys(f"runs.{name}", run, RUN_KEYS)
        if "method" not in run:
            raise LatentLMError(f"runs.{name} needs a method")
        method_class(run["method"])  # an unknown method fails here, before any work
    _check_keys("base", exp.get("base") or {}, {"model", "data", "train", *section_types()})
    ev = _check_keys("eval", exp.get("eval") or {}, EVAL_KEYS)
    if ev.get("prefix", "auto") not in PREFIXES:
        raise LatentLMError(f"eval.prefix={short_repr(ev['prefix'])} must be one of {', '.join(PREFIXES)} "
                            "(docs/EVAL.md)")
    tokens = ev.get("tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise LatentLMError(f"eval.tokens={short_repr(tokens)} must be a positive whole number, or null for the "
                            "whole validation split")
    if exp.get("sae") is not None:
        _check_keys("sae", exp["sae"], SAE_KEYS)
        if "layer" not in exp["sae"]:
            raise LatentLMError("sae needs the teacher layer it reads, e.g. sae: {layer: 1}")
        dead = exp["sae"].get("max_dead")
        if dead is not None and (isinstance(dead, bool) or not isinstance(dead, (int, float)) or not 0 <= dead <= 1):
            raise LatentLMError(f"sae.max_dead={short_repr(dead)} must be a fraction from 0 to 1 (e.g. 0.05)")
    if exp.get("teacher") is not None:
        t = _check_keys("teacher", exp["teacher"], {"path", "overrides", "run"})
        if "run" in t:
            if len(t) > 1:
                raise LatentLMError("teacher takes either run (one of the runs), path or overrides, not several")
            if t["run"] not in runs:
                raise LatentLMError(f"teacher.run={short_repr(t['run'])} is not one of the runs: {', '.join(runs)}")
            if not method_class(runs[t["run"]]["method"]).plain_lm:
                raise LatentLMError(f"teacher.run={t['run']} must be a plain language model run (e.g. method: ntp), "
                                    f"not {runs[t['run']]['method']}")
            if run_seeds(exp, runs[t["run"]]) is not None:
                raise LatentLMError(f"teacher.run={t['run']} is a seeded run; a teacher is one model: name an "
                                    "unseeded run (no seeds for it) or give teacher.path")
    labels = exp.get("labels", True)
    if isinstance(labels, dict):
        _check_keys("labels", labels, {"windows"})
        if labels.get("windows") not in ("all", "read"):
            raise LatentLMError(f"labels.windows={short_repr(labels.get('windows'))} must be all (every training "
                                "window) or read (only the windows the labelled runs' seeds read)")
    elif not isinstance(labels, (bool, str)) or labels == "":
        raise LatentLMError(f"labels={short_repr(labels)} must be true (build a label cache), false (labels on the "
                            "fly), {windows: read} (a cache of the windows the runs read) or the path of a label cache")
    texts = (exp.get("eval") or {}).get("texts") or {}
    if not isinstance(texts, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in texts.items()):
        raise LatentLMError("eval.texts must map a name to a data source, e.g. texts: {shakespeare: shakespeare}")
    report = exp.get("report")
    if report is not None and not (isinstance(report, str) and report and Path(report).name == report
                                   and report not in ("runs", "data", "teacher", "sae", "labels", "texts")):
        raise LatentLMError(f"report={short_repr(report)} must be a plain directory name under out_dir (not runs, "
                            "data, teacher, sae, labels or texts)")
    _check_seeds(exp, runs)
    return exp


def _check_seed_list(where: str, seeds: Any) -> None:
    if not isinstance(seeds, list) or not seeds:
        raise LatentLMError(f"{where}={short_repr(seeds)} must be a non-empty list of seeds, e.g. [0, 1, 2]")
    for s in seeds:
        check_seed(s, where)
    if len(set(seeds)) != len(seeds):
        raise LatentLMError(f"{where}={short_repr(seeds)} names a seed twice; give each seed once")


def _check_seeds(exp: dict[str, Any], runs: dict[str, Any]) -> None:
    """``seeds`` (top level and per run) are lists of distinct seeds; a seeded run does not also set
    train.seed; ``baseline`` names a run."""
    if "seeds" in exp:
        _check_seed_list("seeds", exp["seeds"])
    for name, run in runs.items():
        if "seeds" in run:
            _check_seed_list(f"runs.{name}.seeds", run["seeds"])
        if run_seeds(exp, run) is not None and "seed" in ((run.get("overrides") or {}).get("train") or {}):
            raise LatentLMError(f"runs.{name} sets train.seed and is trained with seeds {run_seeds(exp, run)}; "
                                "drop one of them (seeds set train.seed)")
    baseline = exp.get("baseline")
    if baseline is not None and baseline not in runs:
        raise LatentLMError(f"baseline={short_repr(baseline)} is not a run; name one of: {', '.join(runs)}")


def labels_windows_read(exp: dict[str, Any]) -> bool:
    """Whether the experiment's label cache holds only the windows its runs read (``labels: {windows: read}``)."""
    labels = exp.get("labels")
    return isinstance(labels, dict) and labels.get("windows") == "read"


def run_seeds(exp: dict[str, Any], run: dict[str, Any]) -> list[int] | None:
    """The seeds a run is trained with (its own ``seeds``, else the experiment's), None for one
    unseeded run (its config's train.seed, the directory runs/NAME: today's layout)."""
    return run.get("seeds", exp.get("seeds"))


def is_seeded(exp: dict[str, Any]) -> bool:
    """Whether the experiment names seeds anywhere (then its report aggregates over seeds)."""
    return "seeds" in exp or any("seeds" in r for r in exp["runs"].values())


def plan(exp: dict[str, Any]) -> list[tuple[str, int | None]]:
    """(run name, seed) in training order: unseeded runs first, then seed by seed every run that has
    that seed, so a study stopped early already holds complete comparisons for its first seeds."""
    order = [(name, None) for name, run in exp["runs"].items() if run_seeds(exp, run) is None]
    seeds = list(dict.fromkeys(s for run in exp["runs"].values() for s in (run_seeds(exp, run) or [])))
    for seed in seeds:
        order += [(name, seed) for name, run in exp["runs"].items() if seed in (run_seeds(exp, run) or [])]
    return order




# How a run reports and saves, not what it computes (compare derives the last three from eval.points and
# eval.tokens, and a resumed run may change them).
IGNORED = {"train.progress", "train.eval_every", "train.ckpt_every", "train.eval_batches"}
BUDGET_STEPS = "train.max_steps"  # what compare derives from the budget (and warm-up, capped at half the run)


def config_difference(saved: dict, wanted) -> tuple[str, Any, Any] | None:
    """``(key, saved value, wanted value)`` of the first setting where a run directory's saved config
    differs from the one asked for, else None. Settings given in the experiment come first, then the
    step count derived from the budget, then the warm-up (capped at half the steps, so it may follow
    from them). ``wanted`` is resolved first (settings its method derives, e.g. sizes from an SAE, as
    the run saved them)."""
    method_class(wanted.train.method).resolve_config(wanted)
    diffs = [d for d in config_differences(config_from_dict(saved), wanted) if d[0] not in IGNORED]
    rank = {BUDGET_STEPS: 1, "train.warmup_steps": 2}
    return min(diffs, key=lambda d: rank.get(d[0], 0), default=None)


def config_mismatch(saved: dict, wanted) -> str | None:
    """``"KEY=SAVED (not WANTED)"`` for :func:`config_difference`, else None: reusing a finished run is
    only right if it is the same run."""
    d = config_difference(saved, wanted)
    return None if d is None else f"{d[0]}={d[1]!r} (not {d[2]!r})"


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


# What compare trained its SAE with (next to the SAE it wrote), so a changed sae: section is not silently
# answered by the old SAE.
SAE_RECORD = "compare_sae.json"
SAE_DEFAULTS = {"latents": 4096, "k": 32, "steps": 1000, "lr": 4e-4, "batch_tokens": 4096, "eval_tokens": 50_000,
                "aux_k": None, "aux_coef": None, "dead_tokens": None}


def sae_settings(s: dict[str, Any]) -> dict[str, Any]:
    """The training settings of an experiment's ``sae:`` section, defaults filled in (``max_dead`` is
    a check on the result, not a setting of it)."""
    return {k: s.get(k, default) for k, default in {**SAE_DEFAULTS, "layer": s["layer"]}.items()}


class Comparison:
    """The stages of one experiment; each is a no-op when its output is already complete."""

    def __init__(self, exp: dict[str, Any], progress: bool = True):
        self.exp, self.progress = exp, progress
        self.out = Path(exp["out_dir"])
        self.eval = {"tokens": None, "points": 4, "tasks": [], "limit": None, "batch_size": 16, "prefix": "auto",
                     "texts": {}, "text_tokens": None, **(exp.get("eval") or {})}
        self._device = None

    @property
    def device(self):
        """Where the shared stages (SAE, labels) and the evaluations run: the runs' ``train.device``
        (``base.train.device``, default ``auto``: the GPU when there is one), resolved once."""
        if self._device is None:
            name = ((self.exp.get("base") or {}).get("train") or {}).get("device", "auto")
            self._device = resolve_device(name, option="base.train.device")
        return self._device

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    # --- shared artifacts ----------------------------------------------------------------------

    def data(self) -> Path:
        """The prepared data: given, or tokenized here (a BPE tokenizer trained on the corpus if asked)."""
        d = self.exp["data"]
        if "path" in d:
            load_manifest(d["path"])  # fails early with the reason if it is not prepared data
            return Path(d["path"])
        out = self.out / "data"
        try:
            m = load_manifest(out)
        except LatentLMError:
            pass
        else:  # reused (e.g. by another experiment sharing out_dir) only if it was prepared as asked
            asked = (d["source"], d.get("limit"), d.get("val_fraction", 0.01))
            src = m.get("source") if isinstance(m.get("source"), dict) else {}
            made = (src.get("source"), src.get("limit"), m.get("val_fraction"))
            if asked != made:
                raise LatentLMError(f"{out} was prepared from source, limit, val_fraction {made}, the experiment asks "
                                    f"for {asked}; delete {out} or use another out_dir")
            return out
        kind, tok_path = d.get("tokenizer", "gpt2"), d.get("tokenizer_path")
        if kind == "bpe" and not tok_path:
            tok_path = self.out / "tokenizer.json"
            if not tok_path.is_file():
                self.log(f"training a {d.get('vocab_size', 8192)}-id BPE tokenizer on {d['source']} -> {tok_path}")
                train_bpe(iter_documents(d["source"], limit=d.get("limit")), d.get("vocab_size", 8192), tok_path)
        self.log(f"preparing {d['source']} -> {out}")
        prepare(d["source"], load_tokenizer(kind, tok_path), out, val_fraction=d.get("val_fraction", 0.01),
                limit=d.get("limit"), overwrite=True, progress=self.progress)
        return out

    def config(self, overrides: dict, config_file: str | None = None):
        return make_config(config_file, overrides, base=copy.deepcopy(self.exp.get("base") or {}))

    def teacher(self, data: Path) -> str | None:
        """The teacher of the runs that need one: given, one of the experiment's runs (``run: NAME``), or a
        baseline run trained here on the base config."""
        t = self.exp.get("teacher")
        if t is None:
            return None
        if "path" in t:
            return t["path"]
        if "run" in t:  # one of the experiment's own runs, trained first (it is then reused as a run)
            cfg = self.run_config(t["run"], self.exp["runs"][t["run"]], data, {})
            self._train(cfg, t["run"])
            return cfg.train.out_dir
        cfg = self.config(_merge(t.get("overrides") or {}, {"data": {"path": str(data)}, "train": {
            "method": BASELINE, "out_dir": str(self.out / "teacher"), "progress": self.progress}}))
        self._train(cfg, "teacher")
        return cfg.train.out_dir

    def sae(self, teacher: str, data: Path, seq_len: int) -> str | None:
        s = self.exp.get("sae")
        if s is None:
            return None
        if "path" in s:
            load_sae(s["path"])  # fails early with the reason if it is not an SAE
            return str(s["path"])
        out = self.out / "sae"
        try:
            sae = load_sae(out)
        except LatentLMError:
            pass
        else:  # reused only if it has the asked size and layer, and was trained with the asked settings
            asked = (s.get("latents", 4096), s.get("k", 32), s["layer"])
            if (sae.n_latents, sae.k, sae.meta.get("layer")) != asked:
                raise LatentLMError(f"{out} has latents, k, layer {(sae.n_latents, sae.k, sae.meta.get('layer'))}, the "
                                    f"experiment asks for {asked}; delete {out} or use another out_dir")
            record = out / SAE_RECORD
            if record.is_file():  # SAEs trained before the record existed are checked by size and layer only
                was, now = json.loads(record.read_text())["settings"], sae_settings(s)
                changed = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
                if changed:
                    diff = ", ".join(f"sae.{k}: {was.get(k)} -> {now.get(k)}" for k in changed)
                    raise LatentLMError(f"{out} was trained with other SAE settings than the experiment asks for "
                                        f"({diff}); delete {out} to train it again, or use another out_dir")
            metrics = out / "metrics.json"
            if metrics.is_file():
                self.check_sae_health(out, json.loads(metrics.read_text())["val"])
            return str(out)
        self.log(f"training an SAE on {teacher} block {s['layer']} -> {out}")
        path, m = train_sae_on_teacher(load_teacher(teacher, device=self.device), data, out, layer=s["layer"],
                                       latents=s.get("latents", 4096), device=self.device,
                                       k=s.get("k", 32), steps=s.get("steps", 1000), lr=s.get("lr", 4e-4),
                                       batch_tokens=s.get("batch_tokens", 4096), seq_len=seq_len,
                                       eval_tokens=s.get("eval_tokens", 50_000), progress=self.progress,
                                       **{k: s[k] for k in ("aux_k", "aux_coef", "dead_tokens") if k in s})
        write_json_atomic(Path(path) / SAE_RECORD, {"settings": sae_settings(s)})
        self.log(f"  SAE val fvu {m['val']['fvu']:.3f}, dead {m['val']['dead_fraction']:.3f}")
        self.check_sae_health(path, m["val"])
        return str(path)

    def check_sae_health(self, path: Path, val: dict) -> None:
        """With ``sae.max_dead``: stop before labels and students are built on an SAE with more dead latents."""
        limit = self.exp["sae"].get("max_dead")
        if limit is not None and val["dead_fraction"] > limit:
            raise LatentLMError(f"SAE {path} has {100 * val['dead_fraction']:.1f}% dead latents (val FVU "
                                f"{val['fvu']:.3f}), more than sae.max_dead {100 * limit:g}%; try fewer sae.latents (a "
                                f"small teacher's stream may not use them all), more sae.steps or a lower sae.dead_tokens, "
                                f"delete {path} and rerun")

    def labels(self, teacher: str, sae: str, data: Path, cfg, shared: dict[str, Any]) -> str:
        """The shared label cache ``out_dir/labels``, built unless there: of every training window, or
        with ``labels: {windows: read}`` of just the windows the runs read (:meth:`windows_read`). An
        existing cache (shared with another experiment in this out_dir) must hold all of those."""
        out = self.out / "labels"
        only = labels_windows_read(self.exp)
        if (out / "manifest.json").is_file():
            need = self.windows_read(data, shared)
            have = CachedLabels(out, cfg, data, cfg.seq_len).covers(need)
            if not have.all():
                raise LatentLMError(f"label cache {out} lacks {int((~have).sum()):,} of the {len(need):,} windows this "
                                    "experiment's runs read (it was built for another budget or other seeds); delete "
                                    f"{out} and rerun, which labels the windows every run needs")
            return str(out)
        c = cfg.concepts
        need = self.windows_read(data, shared) if only else None
        what = f"the {len(need):,} training windows the runs read" if only else "every training window"
        self.log(f"labelling {what} with {teacher} + its SAE -> {out}")
        build_label_cache(data, load_teacher(teacher, device=self.device, dtype=cfg.teacher.dtype), load_sae(sae), out,
                          seq_len=cfg.seq_len,
                          layer=c.layer, k_attr=c.k_attr, acts=c.acts, select=c.select, score=c.score,
                          last_position=c.last_position, batch_size=cfg.train.batch_size,
                          windows=need, progress=self.progress)
        return str(out)

    def windows_read(self, data: Path, shared: dict[str, Any]) -> np.ndarray:
        """The training windows (sorted ids) every seed of every run that reads concept labels takes in
        its budget: its loader's first ``max_steps x grad_accum`` batches (:meth:`WindowLoader.upcoming_windows`)."""
        split = TokenSplit(data, "train")
        parts = []
        for name, seed in plan(self.exp):
            run = self.exp["runs"][name]
            if not method_class(run["method"]).needs_concept_labels:
                continue
            cfg = self.run_config(name, run, data, shared, seed)
            tc = cfg.train
            loader = WindowLoader(split, cfg.seq_len, tc.batch_size, seed=tc.seed)
            parts.append(loader.upcoming_windows(tc.max_steps * tc.grad_accum))
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)

    # --- runs ----------------------------------------------------------------------------------

    def check_unseeded_dir(self, name: str) -> None:
        """A seeded run's directories go under runs/NAME; refuse when runs/NAME is itself a run (trained
        before the experiment named seeds), rather than nest runs inside it."""
        old = self.run_dir(name, None)
        if (old / "config.yaml").is_file():
            raise LatentLMError(f"{old} holds a run trained without seeds, and runs.{name} now has seeds (their "
                                f"runs go to {old}/seed-S); move {old} away or use another out_dir")

    def _train(self, cfg, name: str) -> dict:
        run = Path(cfg.train.out_dir)
        if (run / "config.yaml").is_file():
            d = config_difference(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")), cfg)
            if d is not None and d[0] == BUDGET_STEPS:
                (key, amount), = self.exp["budget"].items()
                raise LatentLMError(f"{run} was trained for {d[1]} steps but budget.{key}={short_repr(amount)} now "
                                    f"gives {d[2]}: the budget of an experiment cannot change once its runs exist. "
                                    f"For another budget use a new out_dir (and name), or delete {run} to retrain it")
            if d is not None:
                raise LatentLMError(f"{run} was trained with {d[0]}={d[1]!r} (not {d[2]!r}); the experiment asks "
                                    f"for something else. Delete {run} to retrain it, or use another out_dir")
        if (run / "final.json").is_file():
            self.log(f"[{name}] already trained; reusing {run}")
            return json.loads((run / "final.json").read_text())
        resume = latest_checkpoint(run) is not None
        self.log(f"[{name}] {'resuming' if resume else 'training'} {cfg.train.method} -> {run}")
        try:
            return train(cfg, resume=resume)
        except Interrupted as e:  # compare resumes an unfinished run by itself: no --resume to add
            raise (e.with_resume("run the same command to continue (compare resumes the run)") if e.resume else e) from None

    def run_dir(self, name: str, seed: int | None) -> Path:
        """``out_dir/runs/NAME`` (unseeded, as before seeds existed) or ``out_dir/runs/NAME/seed-S``."""
        return self.out / "runs" / name if seed is None else self.out / "runs" / name / f"seed-{seed}"

    def run_config(self, name: str, run: dict, data: Path, shared: dict[str, Any], seed: int | None = None):
        """The run's config: base <- run config file <- run overrides, then the experiment's data,
        run directory, seed (``train.seed``, when seeded), the shared artifacts (unless the run sets
        them) and the budget's step count."""
        train = {"method": run["method"], "out_dir": str(self.run_dir(name, seed)), "progress": self.progress}
        if seed is not None:
            train["seed"] = seed
        over = _merge(run.get("overrides") or {}, {"data": {"path": str(data)}, "train": train})
        cls = method_class(run["method"])
        # The shared artifacts go to the sections the method declares, unless the run sets them.
        wanted = {"teacher": cls.needs_teacher, "concepts": cls.needs_concept_labels}
        for section, values in shared.items():
            if wanted.get(section):
                mine = over.setdefault(section, {})
                for key, value in values.items():
                    mine.setdefault(key, value)
        cfg = self.config(over, run.get("config"))
        tc = cfg.train
        tokens_per_step = tc.batch_size * cfg.seq_len * tc.grad_accum
        budget = self.exp["budget"]
        if "tokens" in budget:
            steps = budget["tokens"] / tokens_per_step
        else:
            row = flops_report(cfg, [tc.method])[0]
            if "error" in row:
                raise LatentLMError(f"runs.{name}: cannot count its FLOPs for the budget: {row['error']}")
            steps = budget["flops"] / (row["train_total"] * tokens_per_step)
        tc.max_steps = max(1, round(steps))
        tc.eval_every = max(1, tc.max_steps // max(1, self.eval["points"]))
        tc.ckpt_every = tc.eval_every
        tc.warmup_steps = min(tc.warmup_steps, tc.max_steps // 2)
        # The trainer's periodic evaluations (the curves) score the table's held-out tokens, the first ones of the
        # split in whole evaluation batches: exactly them when eval.tokens is a multiple of batch_size x seq_len.
        held_out = self.eval["tokens"] or self.val_tokens(data)
        tc.eval_batches = max(1, math.ceil(held_out / (tc.batch_size * cfg.seq_len)))
        return cfg

    def val_tokens(self, data: Path) -> int:
        """Scorable tokens of the validation split (all but the first)."""
        return len(TokenSplit(data, "val")) - 1

    def curve_tokens(self, cfg) -> int:
        """Validation tokens each point of a run's curve scored: the trainer's ``eval_batches`` as the run
        saved it (a run trained before compare matched the curves to the table may have scored others)."""
        saved = yaml.safe_load((Path(cfg.train.out_dir) / "config.yaml").read_text(encoding="utf-8"))
        tc = config_from_dict(saved).train
        return min(tc.eval_batches * tc.batch_size * cfg.seq_len, self.val_tokens(Path(cfg.data.path)))

    def shared_artifacts(self, data: Path) -> dict[str, dict[str, Any]]:
        """The teacher, SAE (and its layer) and label cache shared by the runs whose methods need a
        teacher or concept labels, built or reused, as config sections (``teacher:``, ``concepts:``);
        empty when no run needs a teacher or the experiment names none."""
        runs = self.exp["runs"]
        teacher = self.teacher(data) if any(method_class(r["method"]).needs_teacher for r in runs.values()) else None
        if not teacher:
            return {}
        shared: dict[str, dict[str, Any]] = {"teacher": {"path": teacher}}
        sae = self.sae(teacher, data, self.config({"data": {"path": str(data)}}).seq_len)
        if not sae:
            return shared
        shared["concepts"] = {"sae": sae, "layer": self.exp["sae"]["layer"]}
        labelled = next(((n, r) for n, r in runs.items() if method_class(r["method"]).needs_concept_labels), None)
        if isinstance(self.exp.get("labels"), str):  # a label cache built elsewhere (checked when a run opens it)
            shared["concepts"]["labels"] = self.exp["labels"]
        elif self.exp.get("labels", True) and labelled:
            # The cache must match the labelled runs' windows and label settings: take them from one.
            shared["concepts"]["labels"] = self.labels(teacher, sae, data, self.run_config(*labelled, data, shared),
                                                       shared)
        return shared

    def evaluate(self, name: str, cfg) -> dict[str, Any]:
        """Held-out loss/ppl/bpb on the same tokens for every run, and the zero-shot tasks."""
        path = Path(cfg.train.out_dir) / "compare_eval.json"
        texts = self.eval["texts"] or {}
        if path.is_file():
            done = json.loads(path.read_text())
            # Zero-shot scores of one report share one prefix: files written before eval.prefix used eos.
            if not self.eval["tasks"] or done.get("zeroshot_prefix_option", "eos") == self.eval["prefix"]:
                missing = [t for t in texts if t not in done.get("texts", {})]
                if not missing:
                    return done
                self.log(f"[{name}] evaluating on {', '.join(missing)}")  # eval.texts grew after this run was scored
                method, cfg, manifest = load_method(cfg.train.out_dir, device=self.device)
                done.setdefault("texts", {}).update(self.score_texts(
                    method, checkpoint_tokenizer(cfg.train.out_dir, manifest), cfg, missing))
                write_json_atomic(path, done)
                return done
            self.log(f"[{name}] its zero-shot scores used another prefix; evaluating again")
        self.log(f"[{name}] evaluating")
        t0 = time.perf_counter()
        method, cfg, manifest = load_method(cfg.train.out_dir, device=self.device)
        tokenizer = checkpoint_tokenizer(cfg.train.out_dir, manifest)
        r = evaluate_tokens(method, TokenSplit(cfg.data.path, "val"), seq_len=cfg.seq_len, batch_size=self.eval["batch_size"],
                            byte_lengths=tokenizer.token_byte_lengths(), max_tokens=self.eval["tokens"],
                            progress=self.progress)
        out: dict[str, Any] = {"val": r, "zeroshot": {}}
        if texts:
            out["texts"] = self.score_texts(method, tokenizer, cfg, list(texts))
        if self.eval["tasks"]:
            out["zeroshot_prefix"] = resolve_prefix(tokenizer, self.eval["prefix"])[0]
            out["zeroshot_prefix_option"] = self.eval["prefix"]
            out["zeroshot"] = evaluate_tasks(method, tokenizer, list(self.eval["tasks"]), limit=self.eval["limit"],
                                             batch_size=self.eval["batch_size"], progress=self.progress,
                                             prefix=self.eval["prefix"])
        out["eval_seconds"] = time.perf_counter() - t0
        write_json_atomic(path, out)
        return out

    def text_file(self, name: str) -> Path:
        """``out_dir/texts/NAME.txt``: the documents of the source ``eval.texts[NAME]`` joined by blank
        lines, written once; ``latentlm eval RUN --text`` scores the same file."""
        path = self.out / "texts" / f"{name}.txt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, "\n\n".join(iter_documents(self.eval["texts"][name])))
        return path

    def score_texts(self, method, tokenizer, cfg, names: list[str]) -> dict[str, Any]:
        """Held-out loss / bpb of each named text (e.g. out-of-domain), its first ``eval.text_tokens``
        tokens (default ``eval.tokens``) in windows of the run's seq_len."""
        cap = self.eval["text_tokens"] if self.eval["text_tokens"] is not None else self.eval["tokens"]
        return {n: evaluate_text(method, tokenizer, text_prefix(tokenizer, self.text_file(n).read_text(encoding="utf-8"),
                                                                cap), seq_len=cfg.seq_len,
                                 batch_size=self.eval["batch_size"], max_tokens=cap, progress=self.progress)
                for n in names}


def text_prefix(tokenizer, text: str, tokens: int | None) -> str:
    """A prefix of ``text`` that still encodes to more than ``tokens`` tokens (all of it for None), so a
    5 MB text is not tokenized whole to score its first tokens. The prefix is cut far (16 characters
    per token, doubled until long enough) beyond the scored tokens, where the cut cannot change them."""
    if tokens is None:
        return text
    n = 16 * (tokens + 2)
    while n < len(text) and len(tokenizer.encode(text[:n])) < tokens + 2:
        n *= 2
    return text[:n]


def run_compare(path: str | Path, *, progress: bool = True) -> Path:
    """Run (or resume) the experiment in ``path``; return the path of its report.md."""
    exp = load_experiment(path)
    c = Comparison(exp, progress)
    c.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = c.data()
    shared = c.shared_artifacts(data)
    summaries = []
    # Seeds, a baseline or held-out texts: the study report (mean +- std, paired differences);
    # otherwise today's report, unchanged.
    seeded = is_seeded(exp) or "baseline" in exp or bool(c.eval["texts"])
    for name, seed in plan(exp):
        run = exp["runs"][name]
        cfg = c.run_config(name, run, data, shared, seed)
        label = name if seed is None else f"{name} seed {seed}"
        if seed is not None:
            c.check_unseeded_dir(name)
        c._train(cfg, label)
        ev = c.evaluate(label, cfg)
        row = flops_report(cfg, [cfg.train.method])[0]
        summaries.append(run_summary(name, cfg, row, ev, curve_tokens=c.curve_tokens(cfg)))
        if seeded:
            summaries[-1].update(seed=cfg.train.seed, texts=ev.get("texts", {}))
    writer = write_seeded_report if seeded else write_report
    # Experiments sharing an out_dir (and so their data, teacher, SAE, labels and identical runs)
    # keep their reports apart with `report: NAME` (out_dir/NAME/report.md).
    where = c.out / exp["report"] if exp.get("report") else c.out
    where.mkdir(parents=True, exist_ok=True)
    report = writer(exp, summaries, where, wall_seconds=time.perf_counter() - t0)
    c.log(f"wrote {report}")
    return report
