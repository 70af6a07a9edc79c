"""The one markdown table of ``benchmarks/gpu_check.sh``, from what its stages left in the output folder.

    python benchmarks/gpu_check_report.py gpu-check > gpu-check/gpu_check.md

Every stage gets rows even when it failed or ran out of time (status and the last line of its log),
so a partial run still says what it measured and where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

TARGET_MFU = 0.50  # NTP at GPT-2 124M (issue "Speed")
TARGET_METHOD = 0.90  # every method's MFU relative to NTP's


def status(rc: str) -> str:
    if rc == "0":
        return "ok"
    if rc in ("124", "130", "137"):
        return "stopped at its time budget"
    if rc == "skipped":
        return "skipped (no time left)"
    return f"failed (exit {rc})"


def last_line(log: Path) -> str:
    if not log.is_file():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200].replace("|", "/") if lines else ""


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--dry", default="0")
    ap.add_argument("--elapsed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    stages = {}
    for line in (out / "stages.tsv").read_text().splitlines() if (out / "stages.tsv").is_file() else []:
        name, rc, secs = line.split("\t")
        stages[name] = (rc, int(secs))
    rows: list[tuple[str, str, str, str]] = []

    def stage_row(name: str, check: str, result: str = "") -> None:
        rc, secs = stages.get(name, ("skipped", 0))
        ok = rc == "0"
        rows.append((check, status(rc), result if ok or result else last_line(out / f"{name}.log"), str(secs)))

    env = {}
    try:
        env = json.loads(last_line(out / "environment.log").replace("/", "|") or "{}")
    except ValueError:
        pass
    missing = env.get("missing", [])
    stage_row("environment", "environment",
              f"Python {env.get('python', '?')}, torch {env.get('torch', '?')}, {env.get('device', 'no CUDA device')}"
              + (f"; missing: {', '.join(missing)}" if missing else ""))
    stage_row("cuda_tests", "CUDA tests (pytest -m cuda)", last_line(out / "cuda_tests.log"))

    seen_ntp = False
    for part in ("throughput_a", "throughput_b"):
        doc = load_json(out / f"{part}.json")
        if not doc:
            stage_row(part, f"training throughput ({part[-1]})")
            continue
        secs = str(stages.get(part, ("", 0))[1])
        for r in doc["rows"]:
            if "failed" in r:
                rows.append((f"train: {r['method']}", r["failed"], "", secs))
                continue
            mfu = r.get("mfu_peak")
            if r["key"] == "ntp":
                if seen_ntp:
                    continue  # the second run's denominator: reported once
                seen_ntp = True
                verdict = "" if mfu is None else \
                    (" (target >= 50%: " + ("met" if mfu >= TARGET_MFU else "not met") + ")")
            else:
                rel = 1 / r["step_vs_flops"]
                verdict = f"; MFU {rel:.2f} x NTP's (target >= {TARGET_METHOD}: " + \
                    ("met" if rel >= TARGET_METHOD else "not met") + ")"
            rows.append((f"train: {r['method']}", "ok",
                         f"{r['tokens_per_s']:,.0f} tok/s, step {r['step_ms']:.1f} ms, MFU {pct(mfu)} of peak, "
                         f"{pct(r['mfu_ceiling'])} of matmul ceiling{verdict}; peak memory {r['peak_mib']:,.0f} MiB "
                         f"({r['mem_vs_ntp']:.2f} x NTP)", secs))

    doc = load_json(out / "decode.json")
    if doc:
        secs = str(stages.get("decode", ("", 0))[1])
        for r in doc["rows"]:
            d, e = r["decode_tok_s"], r["end_to_end_tok_s"]
            comp = d.get("latentlm compiled")
            rows.append((f"decode, batch {r['batch']}", "ok",
                         f"eager {d['latentlm']:,.0f} tok/s" + (f", compiled static {comp:,.0f} tok/s "
                                                               f"({comp / d['latentlm']:.2f} x)" if comp else "")
                         + f"; end to end {e['latentlm']:,.0f}" + (f" / {e['latentlm compiled']:,.0f}" if comp else "")
                         + (f"; same tokens: {r['compiled_same_tokens']}" if "compiled_same_tokens" in r else ""),
                         secs))
    else:
        stage_row("decode", "decode (compiled static vs eager)")

    doc = load_json(out / "generate.json")
    if doc:
        secs = str(stages.get("generate", ("", 0))[1])
        for r in doc["rows"]:
            rows.append((f"KV cache: {r['method']}, context {r['context']}, batch {r['batch']}", "ok",
                         f"{r['cached_tokens_per_s']:,.0f} tok/s cached, {r['speedup']:.1f} x recompute, "
                         f"decode step {r['decode_vs_ntp']:.2f} x NTP's (FLOPs {r['flops_vs_ntp']:.2f} x)", secs))
    else:
        stage_row("generate", "KV cache vs recompute")

    metrics = []
    if (out / "fsdp_metrics.jsonl").is_file():
        metrics = [json.loads(line) for line in (out / "fsdp_metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "loss" in m and "tok_per_s" in m]
    if steps and stages.get("fsdp_train", ("",))[0] == "0":
        last = steps[-1]
        rows.append(("FSDP2 train, 1 rank (torchrun)", "ok",
                     f"{last['step']} steps, loss {steps[0]['loss']:.3f} -> {last['loss']:.3f}, "
                     f"{last['tok_per_s']:,.0f} tok/s" + (f", MFU {pct(last['mfu'])}" if "mfu" in last else ""),
                     str(stages["fsdp_train"][1])))
    else:
        stage_row("fsdp_train", "FSDP2 train, 1 rank (torchrun)")

    kind = "CPU dry run (GPU_CHECK_DRY=1, tiny shapes)" if a.dry == "1" else env.get("device", "GPU")
    print(f"# GPU check: {kind}\n")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, `bash benchmarks/gpu_check.sh`, "
          f"{a.elapsed} s in all\n")
    print("| check | status | result | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
