"""`latentlm compare`'s shared stages: they run on the runs' device (`base.train.device`, `auto` = the GPU
when there is one), not on the CPU by default (CI has no GPU: the device the stages receive is recorded,
with the real work done on the CPU); an SAE is reused only when the experiment asks for the settings it
was trained with; a stop inside a run says how compare continues."""

from __future__ import annotations

import pytest
import torch
import yaml

import latentlm.compare as compare
from latentlm.errors import LatentLMError

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def write(tmp_path, data_dir, device=None):
    train = {"batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "eval_batches": 1, "log_every": 1}
    if device is not None:
        train["device"] = device
    exp = {"name": "device", "out_dir": str(tmp_path / "cmp"), "data": {"path": str(data_dir)},
           "base": {"model": dict(TINY_MODEL, n_layer=2), "train": train, "data": {"seq_len": 16},
                    "cocomix": {"insert_layer": 1}},
           "budget": {"tokens": 2 * 16 * 2}, "teacher": {"run": "ntp"},
           "sae": {"layer": 1, "latents": 32, "k": 4, "steps": 2, "batch_tokens": 64, "eval_tokens": 64},
           "labels": True, "eval": {"tokens": 64, "points": 1},
           "runs": {"ntp": {"method": "ntp"}, "cocomix": {"method": "cocomix"}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_shared_stages_and_evaluation_get_the_runs_device(tmp_path, byte_wiki, monkeypatch):
    seen: dict[str, list] = {"teacher": [], "sae": [], "eval": []}
    gpu = torch.device("cuda:3")  # what auto resolves to on a GPU machine, stood in for here
    monkeypatch.setattr(compare, "resolve_device", lambda name, option: gpu if name == "auto" else torch.device(name))
    real_teacher, real_sae, real_method = compare.load_teacher, compare.train_sae_on_teacher, compare.load_method

    def load_teacher(spec, device="cpu", **kw):
        seen["teacher"].append(device)
        return real_teacher(spec, **kw)

    def train_sae(*a, device="cpu", **kw):
        seen["sae"].append(device)
        return real_sae(*a, **kw)

    def load_method(path, device="cpu"):
        seen["eval"].append(device)
        return real_method(path)

    monkeypatch.setattr(compare, "load_teacher", load_teacher)
    monkeypatch.setattr(compare, "train_sae_on_teacher", train_sae)
    monkeypatch.setattr(compare, "load_method", load_method)
    compare.run_compare(write(tmp_path, byte_wiki), progress=False)
    assert seen["teacher"] == [gpu, gpu]  # the SAE's teacher and the label cache's
    assert seen["sae"] == [gpu] and seen["eval"] == [gpu, gpu]  # one evaluation per run


def test_a_device_this_machine_lacks_is_one_line(tmp_path, byte_wiki):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(LatentLMError, match="no CUDA device is available"):
        compare.run_compare(write(tmp_path, byte_wiki, device="cuda"), progress=False)


def test_a_stopped_run_says_how_compare_continues(tmp_path, byte_wiki, monkeypatch):
    """SIGTERM inside one of compare's runs: the trainer's advice (`--resume`) is for `latentlm train`;
    compare resumes by itself, so its stop says to run the same command again."""
    import signal

    from latentlm.errors import Interrupted

    def stopped(cfg, resume=False):
        raise Interrupted("SIGTERM at step 3: saved runs/x/checkpoints/step_00000003", signal.SIGTERM,
                          resume="run the same command with --resume to continue")

    monkeypatch.setattr(compare, "train", stopped)
    with pytest.raises(Interrupted) as e:
        compare.run_compare(write(tmp_path, byte_wiki), progress=False)
    assert e.value.exit_code == 143 and "--resume" not in str(e.value)
    assert str(e.value) == ("SIGTERM at step 3: saved runs/x/checkpoints/step_00000003; run the same command to "
                            "continue (compare resumes the run)")


def test_an_sae_trained_with_other_settings_is_not_reused(tmp_path, byte_wiki):
    path = write(tmp_path, byte_wiki)
    exp = yaml.safe_load(path.read_text())
    exp["labels"] = False  # cocomix labels on the fly: no label cache to build
    path.write_text(yaml.safe_dump(exp))
    compare.run_compare(path, progress=False)
    record = tmp_path / "cmp" / "sae" / compare.SAE_RECORD
    assert record.is_file()
    compare.run_compare(path, progress=False)  # the same settings: reused
    exp["sae"]["aux_k"] = 16
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(LatentLMError, match=r"trained with other SAE settings than the experiment asks for "
                                            r"\(sae\.aux_k: None -> 16\); delete .*sae to train it again"):
        compare.run_compare(path, progress=False)
