"""The command line end to end, and its behaviour on bad input."""

import json
import subprocess
import sys

import pytest

from latentlm.cli import main

from conftest import TINY_MODEL

MODEL = [x for k, v in TINY_MODEL.items() for x in (f"--model.{k}", str(v))]


def test_prepare_train_eval_generate(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "--tokenizer", "byte", "--limit", "120", "--out", str(data), "--quiet"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", *MODEL, "--data.path", str(data), "--train.out_dir", str(run), "--train.max_steps", "30", "--train.warmup_steps", "3",
                 "--train.batch_size", "4", "--train.lr", "3e-3", "--train.progress", "false"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    final = json.loads((run / "final.json").read_text())
    # end-of-text tokens are scored but stand for 0 bytes
    assert r["tokens"] > 1000 and r["tokens"] - 10 < r["bytes"] < r["tokens"]
    assert r["bpb"] == pytest.approx(r["loss"] * r["tokens"] / (0.6931471805599453 * r["bytes"]), rel=1e-9)
    assert r["loss"] < 4.0  # trained: well below the uniform 5.55 nats
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    assert main(["eval", str(run), "--text", str(text), "--json", "--quiet", "--stride", "16", "--seq-len", "32"]) == 0
    rt = json.loads(capsys.readouterr().out)
    assert rt["tokens"] == rt["bytes"] == len(text.read_text().encode())
    assert main(["generate", str(run), "--prompt", "The", "--prompt", "A longer prompt", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The") and "A longer prompt" in out
    assert final["val_loss"] > 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "latentlm", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["train", "--model.n_layers", "2"], "unknown config key 'model.n_layers'"),
    (["train", "--train.lr", "-1"], "train.lr=-1.0 must be positive and finite"),
    (["train", "--data.path", "/nonexistent/data"], "/nonexistent/data"),
    (["eval", "/nonexistent/run"], "no checkpoint found at /nonexistent/run"),
    (["prepare", "--source", "/nonexistent/corpus.txt", "--out", "OUT"], "/nonexistent/corpus.txt"),
    (["prepare", "--tokenizer", "bpe", "--out", "OUT"], "tokenizer.json"),
])
def test_bad_input_one_line_exit_2_no_output(args, needle, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    p = run_cli(*args, "--train.out_dir", str(tmp_path / "run")) if args[0] == "train" else run_cli(*args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_debug_shows_traceback():
    p = run_cli("train", "--model.n_layers", "2", "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_trained_bpe_travels_with_data_and_checkpoint(bpe_path, tmp_path, capsys):
    """The tokenizer.json is copied into the prepared directory and every checkpoint, so eval
    and generate keep working after the original file is gone."""
    import shutil

    tok = tmp_path / "tok.json"
    shutil.copyfile(bpe_path, tok)
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "--tokenizer", "bpe", "--tokenizer-path", str(tok), "--limit", "60",
                 "--out", str(data), "--quiet"]) == 0
    model = [a if a != "257" else "512" for a in MODEL]
    assert main(["train", *model, "--data.path", str(data), "--train.out_dir", str(run), "--train.max_steps", "2",
                 "--train.batch_size", "2", "--train.progress", "false"]) == 0
    tok.unlink()
    assert (data / "tokenizer.json").is_file()
    ckpt = next((run / "checkpoints").iterdir())
    assert json.loads((ckpt / "manifest.json").read_text())["tokenizer"]["path"] == "tokenizer.json"
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Paris is", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Paris is")
    assert main(["eval", str(run), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_eval_reports_ponder_modes(tmp_path, byte_wiki, capsys):
    run = tmp_path / "ponder"
    assert main(["train", *MODEL, "--data.path", str(byte_wiki), "--train.out_dir", str(run), "--train.method", "ponder",
                 "--train.max_steps", "4", "--train.batch_size", "2", "--train.lr", "3e-3", "--train.warmup_steps", "1",
                 "--train.eval_batches", "1", "--train.progress", "false"]) == 0
    final = json.loads((run / "final.json").read_text())
    assert final["val_eval_mode"] == "jacobi" and final["val_jacobi_residual"] >= 0
    capsys.readouterr()
    assert main(["eval", str(run), "--mode", "all", "--json", "--quiet", "--max-tokens", "200"]) == 0
    jac, exact = json.loads(capsys.readouterr().out)
    assert (jac["eval_mode"], exact["eval_mode"]) == ("jacobi", "exact") and jac["jacobi_iters"] == 3
    assert jac["tokens"] == exact["tokens"] == 200 and "jacobi_residual" not in exact
    # for K=1, three Jacobi iterations leave only later positions approximate: the two agree closely
    assert jac["loss"] == pytest.approx(exact["loss"], rel=0.05)
    assert main(["eval", str(run), "--mode", "exact", "--quiet", "--max-tokens", "100"]) == 0
    assert "[exact]" in capsys.readouterr().out


def test_eval_mode_of_single_mode_method_is_an_error(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    main(["prepare", "--tokenizer", "byte", "--limit", "40", "--out", str(data), "--quiet"])
    main(["train", *MODEL, "--data.path", str(data), "--train.out_dir", str(run), "--train.max_steps", "1",
          "--train.batch_size", "2", "--train.progress", "false"])
    capsys.readouterr()
    assert main(["eval", str(run), "--mode", "exact"]) == 2
    assert "method 'ntp' has no evaluation mode 'exact'" in capsys.readouterr().err
    # --mode all on a single-mode method: its one way of evaluating, not an empty list
    assert main(["eval", str(run), "--mode", "all", "--json", "--quiet", "--max-tokens", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 50
