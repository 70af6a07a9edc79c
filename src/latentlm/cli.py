"""``latentlm <command>``: a thin argument layer over the library's functions.

User errors (:class:`LatentLMError`) print one line and exit with status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latentlm.errors import LatentLMError


def _tokenizer(name: str, path: str | None):
    from latentlm.data.tokenizers import load_tokenizer

    return load_tokenizer(name, path)


def cmd_prepare(a: argparse.Namespace) -> None:
    from latentlm.data.prepare import prepare

    m = prepare(a.source, _tokenizer(a.tokenizer, a.tokenizer_path), a.out, val_fraction=a.val_fraction,
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

    cfg = make_config(a.config, overrides)
    train(cfg, resume=a.resume)


def cmd_eval(a: argparse.Namespace) -> None:
    from latentlm.train.checkpoint import checkpoint_tokenizer, load_method

    method, cfg, manifest = load_method(a.checkpoint, a.device)
    tokenizer = checkpoint_tokenizer(a.checkpoint, manifest)
    seq_len = a.seq_len or cfg.seq_len
    kw = dict(seq_len=seq_len, batch_size=a.batch_size, stride=a.stride, max_tokens=a.max_tokens, progress=not a.quiet)
    modes = [None] if a.mode is None else list(method.eval_modes) if a.mode == "all" else [a.mode]
    if a.mode is not None and a.mode != "all":
        method.set_eval_mode(a.mode)  # a bad mode fails here, before any work
    results = []
    for mode in modes:
        if mode is not None:
            method.set_eval_mode(mode)
        results.append(_eval_once(a, method, cfg, manifest, tokenizer, kw))
    if a.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
        return
    for r in results:
        mode = f" [{r['eval_mode']}" + (f", n={r['jacobi_iters']}" if "jacobi_iters" in r else "") + "]" \
            if "eval_mode" in r else ""
        resid = f"  jacobi residual {r['jacobi_residual']:.3g}" if "jacobi_residual" in r else ""
        print(f"{r['on']}{mode}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  bpb {r['bpb']:.4f}  ({r['tokens']:,} tokens, "
              f"window {r['seq_len']}, stride {r['stride']}){resid}")


def _eval_once(a: argparse.Namespace, method, cfg, manifest: dict, tokenizer, kw: dict) -> dict:
    from latentlm.data.loader import TokenSplit
    from latentlm.data.prepare import check_tokenizer, load_manifest
    from latentlm.eval.perplexity import evaluate_text, evaluate_tokens

    if a.text:
        p = Path(a.text)
        if not p.is_file():
            raise LatentLMError(f"--text {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LatentLMError(f"--text {p} is not UTF-8 text") from None
        r, where = evaluate_text(method, tokenizer, text, **kw), str(p)
    else:
        data = a.data or manifest["data"]
        check_tokenizer(load_manifest(data), tokenizer, vocab_size=cfg.model.vocab_size)
        r = evaluate_tokens(method, TokenSplit(data, a.split), byte_lengths=tokenizer.token_byte_lengths(), **kw)
        where = f"{data} [{a.split}]"
    r.update({"checkpoint": str(a.checkpoint), "on": where, "seq_len": kw["seq_len"], "stride": a.stride or kw["seq_len"]})
    return r


def cmd_generate(a: argparse.Namespace) -> None:
    from latentlm.generate import generate
    from latentlm.train.checkpoint import checkpoint_tokenizer, load_method

    method, _, manifest = load_method(a.checkpoint, a.device)
    tokenizer = checkpoint_tokenizer(a.checkpoint, manifest)
    prompts = a.prompt or [""]
    ids = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]
    if a.steer:
        if not hasattr(method, "set_steering"):
            raise LatentLMError(f"--steer needs a cocomix checkpoint; this one was trained with {method.name!r}")
        concepts, alphas = [], []
        for item in a.steer:
            try:
                c, alpha = item.split("=")
                concepts.append(int(c))
                alphas.append(float(alpha))
            except ValueError:
                raise LatentLMError(f"--steer {item!r} is not CONCEPT=ALPHA (e.g. --steer 123=5)") from None
        method.set_steering(concepts, alphas, on_prompt=a.steer_prompt)
    outs = generate(method, ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                    top_p=a.top_p, eot_id=tokenizer.eot_id, stop_at_eot=not a.no_stop, seed=a.seed)
    for p, o in zip(prompts, outs):
        print(p + tokenizer.decode(o))
        if len(prompts) > 1:
            print("-" * 40)


def _teacher_and_data(a: argparse.Namespace):
    """The teacher of ``--teacher`` and the train/val splits of ``--data``, whose tokenizer must be the teacher's."""
    from latentlm.concepts.teacher import load_teacher
    from latentlm.data.loader import TokenSplit
    from latentlm.data.prepare import check_tokenizer, load_manifest

    manifest = load_manifest(a.data)
    teacher = load_teacher(a.teacher, device=a.device)
    check_tokenizer(manifest, teacher.tokenizer)
    return teacher, TokenSplit(a.data, "train"), TokenSplit(a.data, "val")


def cmd_sae_train(a: argparse.Namespace) -> None:
    from latentlm.concepts.sae import evaluate_sae, save_sae, train_sae
    from latentlm.data.loader import WindowLoader, iter_eval_windows
    from latentlm.fileio import write_json_atomic

    teacher, train_split, val_split = _teacher_and_data(a)
    windows = max(1, min(a.batch_tokens // a.seq_len, (len(train_split) - 1) // a.seq_len))
    loader = WindowLoader(train_split, a.seq_len, windows, seed=a.seed)

    def stream():
        while True:  # the loader starts a new epoch whenever one is used up; train_sae stops at --steps
            yield teacher.hidden(loader.next_batch()[0], a.layer)

    meta = {"teacher": teacher.describe(), "layer": a.layer, "tokenizer_fingerprint": teacher.tokenizer.fingerprint()}
    sae, train_metrics = train_sae(stream(), teacher.d_model, a.latents, a.k, steps=a.steps, lr=a.lr,
                                   batch_tokens=a.batch_tokens, seed=a.seed, device=a.device, progress=not a.quiet,
                                   meta=meta)
    val = (teacher.hidden(x, a.layer) for x, _ in iter_eval_windows(val_split, a.seq_len, windows))
    metrics = evaluate_sae(sae.to(a.device), val, max_tokens=a.eval_tokens)
    out = save_sae(sae.cpu(), a.out)
    write_json_atomic(out / "metrics.json", {"val": metrics, "train": {k: v for k, v in train_metrics.items()
                                                                        if k != "history"}})
    print(f"wrote {out}: {a.latents} latents, k {a.k}, layer {a.layer}, {train_metrics['steps']} steps; val fvu "
          f"{metrics['fvu']:.4f}  dead {metrics['dead_fraction']:.3f}  mean active {metrics['mean_active']:.2f}")


def _sae_layer_teacher(a: argparse.Namespace):
    """The SAE of ``--sae``, its teacher layer (``--layer`` or the SAE's record) and the teacher."""
    from latentlm.concepts.sae import load_sae

    sae = load_sae(a.sae)
    layer = a.layer if a.layer is not None else sae.meta.get("layer")
    if layer is None:
        raise LatentLMError(f"SAE {a.sae} does not record its teacher layer; pass --layer")
    teacher, _, _ = _teacher_and_data(a)
    return sae, layer, teacher


def cmd_concepts_label(a: argparse.Namespace) -> None:
    from latentlm.concepts.labels import build_label_cache

    sae, layer, teacher = _sae_layer_teacher(a)
    m = build_label_cache(a.data, teacher, sae, a.out, seq_len=a.seq_len, layer=layer, k_attr=a.k_attr, acts=a.acts,
                          select=a.select, batch_size=a.batch_size, limit_windows=a.limit_windows,
                          progress=not a.quiet)
    n, t, k = m["labels"]["shape"]
    print(f"wrote {a.out}: labels of {n:,} windows x {t} tokens x {k} (layer {layer}, {a.acts}, {a.select})")


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
    from latentlm.train.checkpoint import checkpoint_tokenizer, load_method

    method, cfg, manifest = load_method(a.checkpoint, a.device)
    if manifest["method"] != "cocomix":
        raise LatentLMError(f"concepts inspect needs a cocomix checkpoint; {a.checkpoint} was trained with "
                            f"{manifest['method']!r}")
    sae_dir = a.sae or cfg.cocomix.sae
    contexts = load_contexts(sae_dir) if sae_dir else None
    records = inspect_text(method, checkpoint_tokenizer(a.checkpoint, manifest), a.text, top=a.top, contexts=contexts)
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


def cmd_demo(a: argparse.Namespace) -> None:
    from latentlm.demo import run_demo

    run_demo(a.out)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p = argparse.ArgumentParser(prog="latentlm", parents=[common],
                                description="Pretrain language models that think in continuous space.")
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
                       epilog="example: latentlm train --config configs/tiny.yaml --train.max_steps 200")
    s.add_argument("--config", help="YAML config (see configs/)")
    s.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    s.set_defaults(fn=cmd_train, takes_overrides=True)

    s = add(sub, "eval", help="perplexity and bits per byte of a checkpoint")
    s.add_argument("checkpoint", help="run directory (latest checkpoint) or checkpoints/step_* directory")
    s.add_argument("--text", help="evaluate on this UTF-8 text file instead of the prepared split")
    s.add_argument("--data", help="prepared data directory (default: the one the model was trained on)")
    s.add_argument("--split", default="val", choices=["train", "val"])
    s.add_argument("--seq-len", type=int, help="window length (default: training length)")
    s.add_argument("--stride", type=int, help="sliding-window stride (default: window length)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    s.add_argument("--device", default="cpu")
    s.add_argument("--mode", help="evaluation mode of methods that have several, or 'all' "
                   "(ponder: jacobi = eval_iters Jacobi iterations as the paper, exact = sequential thoughts)")
    s.add_argument("--json", action="store_true", help="print one JSON object (a list with --mode all)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = add(sub, "generate", help="sample text from a checkpoint (KV cache, batched prompts)")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-stop", action="store_true", help="do not stop at end-of-text")
    s.add_argument("--steer", action="append", metavar="CONCEPT=ALPHA",
                   help="cocomix: multiply this concept's predicted logit by ALPHA before the TopK (repeatable)")
    s.add_argument("--steer-prompt", action="store_true", help="also steer at prompt positions")
    s.add_argument("--device", default="cpu")
    s.set_defaults(fn=cmd_generate)

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
    t.add_argument("--device", default="cpu")
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
    t.add_argument("--layer", type=int, help="teacher layer (default: the SAE's)")
    t.add_argument("--batch-size", type=int, default=8, help="windows per teacher pass")
    t.add_argument("--limit-windows", type=int, help="only the first N windows (tests, dry runs)")
    t.add_argument("--device", default="cpu")
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
    t.add_argument("--device", default="cpu")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=cmd_concepts_contexts)
    t = add(csub, "inspect", help="the concepts a cocomix checkpoint predicts at each token of a text")
    t.add_argument("checkpoint", help="cocomix run directory or checkpoints/step_* directory")
    t.add_argument("--text", required=True, help="text to inspect")
    t.add_argument("--top", type=int, default=5, help="concepts shown per token")
    t.add_argument("--sae", help="SAE directory with contexts.json for descriptions (default: the run's cocomix.sae)")
    t.add_argument("--json", action="store_true", help="print the per-token records as JSON")
    t.add_argument("--device", default="cpu")
    t.set_defaults(fn=cmd_concepts_inspect)

    s = add(sub, "demo", help="the embedded-default run: prepare, train, evaluate, sample")
    s.add_argument("--out", default="runs/demo")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    debug = args.debug
    try:
        if getattr(args, "takes_overrides", False):
            args.fn(args, rest)
        else:
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            args.fn(args)
    except LatentLMError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
