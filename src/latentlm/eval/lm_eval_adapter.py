"""A latentlm checkpoint as an EleutherAI lm-evaluation-harness model (optional extra ``lm-eval``).

Importing this module registers the model ``latentlm`` with the harness. The harness's own
``lm_eval`` command never imports it, so run the harness through ``latentlm lm-eval`` (which
imports it, adds the offline copies of the paper's tasks, :mod:`latentlm.eval.lm_eval_tasks`, and
hands its arguments to the harness's command line, :func:`run_cli`)::

    latentlm lm-eval --model latentlm --model_args checkpoint=runs/demo/runs/ntp --tasks offline_piqa

or from Python: ``lm_eval.simple_evaluate(model=LatentLMEvalModel(method=m, tokenizer=t), tasks=[...])``.
Requests go through the same code as ``latentlm eval --tasks``: log-likelihoods through
:func:`~latentlm.eval.zeroshot.score_requests` (each method's own forward, after the prefix of
:func:`~latentlm.eval.zeroshot.resolve_prefix`), rolling log-likelihoods through
:func:`~latentlm.eval.perplexity.evaluate_tokens` (non-overlapping windows), and generation
through :func:`~latentlm.generate.generate`. Only this module imports ``lm_eval``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from latentlm.errors import LatentLMError

try:
    import lm_eval.models  # noqa: F401  the harness's own models first: it only registers them into an empty registry
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise LatentLMError("the lm-evaluation-harness adapter needs lm-eval; run `pip install 'latentlm[lm-eval]'`") from None

import torch
import yaml
from tqdm.auto import tqdm

from latentlm.devices import resolve_device
from latentlm.eval.lm_eval_tasks import default_tasks_dir, write_tasks
from latentlm.eval.perplexity import evaluate_tokens
from latentlm.eval.zeroshot import resolve_max_len, resolve_prefix, score_requests, start_id
from latentlm.generate import generate
from latentlm.loading import checkpoint_tokenizer, load_method
from latentlm.methods.base import Method


@register_model("latentlm")
class LatentLMEvalModel(LM):
    """Either ``checkpoint`` (a run or checkpoint directory, loaded on ``device``: auto, cpu, cuda,
    cuda:N) or an in-memory ``method`` with its ``tokenizer``. ``max_len`` is the scoring window in
    tokens (default: the training window); ``max_gen_toks`` the default generation length;
    ``prefix`` what goes before every request (auto, eos, bos, none: as ``latentlm eval --prefix``);
    ``mode`` an evaluation mode of methods that have several (ponder: jacobi, exact)."""

    def __init__(self, checkpoint: str | None = None, *, method: Method | None = None, tokenizer: Any = None,
                 device: str = "cpu", batch_size: int | str = 16, max_len: int | None = None,
                 max_gen_toks: int = 256, prefix: str = "auto", mode: str | None = None, **harness_options: Any):
        super().__init__()
        if (checkpoint is None) == (method is None):
            raise LatentLMError("pass either checkpoint=PATH or method= and tokenizer=")
        if checkpoint is not None:
            method, _, manifest = load_method(str(checkpoint), _device(str(device)))
            tokenizer = checkpoint_tokenizer(str(checkpoint), manifest)
        elif tokenizer is None:
            raise LatentLMError("an in-memory method needs its tokenizer= too")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise LatentLMError(f"batch_size={batch_size!r} must be a positive integer ('auto' is not supported)")
        # harness_options: what the harness passes every model (max_batch_size, ...); batches here have a fixed size.
        self.method, self.tokenizer = method, tokenizer
        self.batch_size = int(batch_size)
        self.max_len = resolve_max_len(method, None if max_len is None else int(max_len))
        self.max_gen_toks = int(max_gen_toks)
        self.prefix, self.prefix_ids = resolve_prefix(tokenizer, str(prefix))
        # The context of a rolling window or prompt with no prefix: BOS (end-of-text without one), as the harness.
        self.start_ids = self.prefix_ids or [start_id(tokenizer)]
        if mode is not None:
            method.set_eval_mode(str(mode))

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is greedy) per ``(context, continuation)``."""
        return score_requests(self.method, self.tokenizer, [r.args for r in requests], batch_size=self.batch_size,
                              max_len=self.max_len, greedy=True, progress=not disable_tqdm, desc="loglikelihood",
                              prefix=self.prefix_ids)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole string after the prefix (BOS or end-of-text without
        one), in windows of ``max_len`` tokens."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            ids = self.start_ids + self.tokenizer.encode(req.args[0])
            if len(ids) < 2:
                out.append(0.0)  # the empty string: probability 1
                continue
            r = evaluate_tokens(self.method, ids, seq_len=self.max_len, batch_size=self.batch_size)
            out.append(-r["loss"] * r["tokens"])
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with ``do_sample``, sampled) continuations cut before the first stop string.
        Consecutive requests with equal generation options share a batch."""
        out: list[str] = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            i = 0
            while i < len(requests):
                options = requests[i].args[1]
                j = i + 1
                while j < len(requests) and j - i < self.batch_size and \
                        json.dumps(requests[j].args[1], sort_keys=True, default=str) == \
                        json.dumps(options, sort_keys=True, default=str):
                    j += 1
                out.extend(self._generate([r.args[0] for r in requests[i:j]], dict(options)))
                bar.update(j - i)
                i = j
        return out

    def _generate(self, contexts: list[str], options: dict[str, Any]) -> list[str]:
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = max(1, min(int(options.get("max_gen_toks", self.max_gen_toks)), self.max_len - 1))
        temperature = float(options.get("temperature", 1.0)) if options.get("do_sample") else 0.0
        prompts = [(self.prefix_ids + self.tokenizer.encode(c) or self.start_ids)[-(self.max_len - max_new):]
                   for c in contexts]
        texts = []
        for ids in generate(self.method, prompts, max_new_tokens=max_new, temperature=temperature,
                            eot_id=self.tokenizer.eot_id, seed=0):
            text = self.tokenizer.decode(ids)
            cut = min((text.index(s) for s in until if s and s in text), default=len(text))
            texts.append(text[:cut])
        return texts


def _device(name: str):
    """The torch device of ``device=``; the harness passes cuda:0 unless told otherwise, so without a GPU
    that falls back to the CPU with a warning, as the harness's own ``hf`` model does."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        print(f"warning: device {name} is not available here; using cpu", file=sys.stderr, flush=True)
        name = "cpu"
    return resolve_device(name, option="device")


def run_cli(argv: list[str]) -> int:
    """lm-evaluation-harness's command line (``lm_eval ARGS``) with the ``latentlm`` model registered and
    the offline task files (:func:`latentlm.eval.lm_eval_tasks.write_tasks`) on its task path, next to
    any ``--include_path`` of the arguments. Returns the exit status."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the offline tasks read local files only
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        ours = [str(write_tasks(default_tasks_dir()))]
    except LatentLMError as e:  # the harness's own tasks still run
        print(f"warning: no offline tasks: {e}", file=sys.stderr, flush=True)
        ours = []
    setup_logging()
    saved_argv = sys.argv
    sys.argv = ["lm-eval", *argv]  # the harness's parser reads sys.argv itself
    try:
        parser = HarnessCLI()
        args = parser.parse_args()
        if hasattr(args, "include_path"):  # run, ls, validate
            theirs = args.include_path or _config_include_path(getattr(args, "config", None))
            args.include_path = [*ours, *([theirs] if theirs else [])] or None
        parser.execute(args)
    except SystemExit as e:  # the harness's argparse (--help, bad arguments)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


def _config_include_path(config: str | None) -> str | None:
    """The ``include_path`` of a harness ``--config`` YAML file, which the command line would otherwise replace."""
    if not config:
        return None
    try:
        with open(config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None  # the harness reports the bad file itself
    return loaded.get("include_path") if isinstance(loaded, dict) else None
