"""Bad input: one clear line on stderr, exit status 2, nothing written."""
import json
import os
import shutil

import pytest

from fastunlearn.worlds import people as world
from fastunlearn.cli import main

from conftest import FORGET, tree


def run_error(capsys, argv, *expected, status=2):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == status, (rc, err)
    assert err.startswith("fastunlearn: error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_missing_checkpoint(capsys, tmp_path, forget):
    run_error(capsys, ["apply", str(tmp_path / "nope"), str(forget)], "not a folder")


def test_not_a_checkpoint(capsys, tmp_path, forget):
    (tmp_path / "empty").mkdir()
    run_error(capsys, ["apply", str(tmp_path / "empty"), str(forget)], "no config.json")


def test_pickle_only_checkpoint(capsys, ckpt, forget):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    before = tree(ckpt)
    run_error(capsys, ["apply", str(ckpt), str(forget)], "pickle")
    assert tree(ckpt) == before


def test_architecture_without_adapter(capsys, ckpt, forget):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "fuyu"}))
    run_error(capsys, ["apply", str(ckpt), str(forget)], "'fuyu' has no fastunlearn adapter", "llava", "qwen2_vl",
              "paligemma", "mllama")
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llama4"}))
    run_error(capsys, ["apply", str(ckpt), str(forget)], "'llama4'", "torchvision")


def test_truncated_safetensors(capsys, ckpt, forget):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-100])
    before = tree(ckpt)
    run_error(capsys, ["apply", str(ckpt), str(forget)], "model.safetensors", "truncated")
    assert tree(ckpt) == before


def test_malformed_safetensors_header(capsys, ckpt, forget):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[8:9] = b"["  # header JSON no longer parses
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    run_error(capsys, ["apply", str(ckpt), str(forget)], "malformed safetensors header")


def test_empty_forget_folder(capsys, ckpt, tmp_path):
    (tmp_path / "f").mkdir()
    before = tree(ckpt)
    run_error(capsys, ["apply", str(ckpt), str(tmp_path / "f")], "no images")
    assert tree(ckpt) == before


def test_unreadable_image_named(capsys, ckpt, forget):
    bad = forget / world.slug(FORGET[0]) / "0.png"
    bad.write_bytes(b"not an image")
    before = tree(ckpt)
    run_error(capsys, ["apply", str(ckpt), str(forget)], str(bad), "unreadable image")
    assert tree(ckpt) == before


def test_bad_jsonl_line_named(capsys, ckpt, forget):
    qa = forget / world.slug(FORGET[0]) / "qa.jsonl"
    qa.write_text(qa.read_text() + "{broken\n")
    run_error(capsys, ["apply", str(ckpt), str(forget)], f"{qa}:2", "not valid JSON")


def test_jsonl_naming_a_missing_image(capsys, ckpt, forget):
    qa = forget / world.slug(FORGET[0]) / "qa.jsonl"
    qa.write_text(json.dumps({"image": "missing.png", "question": "Who?", "answer": "X"}) + "\n")
    run_error(capsys, ["apply", str(ckpt), str(forget)], f"{qa}:1", "missing.png", "does not exist")


def test_out_inside_the_source(capsys, ckpt, forget):
    before = tree(ckpt)
    run_error(capsys, ["apply", str(ckpt), str(forget), "--out", str(ckpt / "sub")], "inside the source checkpoint")
    assert tree(ckpt) == before


def test_out_not_empty(capsys, ckpt, forget, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    run_error(capsys, ["apply", str(ckpt), str(forget), "--out", str(tmp_path / "taken")], "not empty")
    assert (tmp_path / "taken" / "x").read_text() == "keep"


def test_bad_method(capsys, ckpt, forget):
    run_error(capsys, ["apply", str(ckpt), str(forget), "--method", "magic"], "--method", "npo")


def test_read_only_checkpoint_is_refused_before_work(capsys, ckpt, forget, monkeypatch):
    # as root, permissions are not enforced; simulate what os.access reports for a read-only folder
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK and str(p).startswith(str(ckpt))
                        else real(p, mode))
    import fastunlearn.job as job
    monkeypatch.setattr(job, "unlearn", lambda *a, **k: pytest.fail("work started on a read-only checkpoint"))
    run_error(capsys, ["apply", str(ckpt), str(forget)], "read-only", "--out")


def test_checkpoint_changed_during_the_job(ckpt, forget, monkeypatch, capsys):
    import fastunlearn.job as job

    real = job.unlearn

    def rewrite_then_run(*a, **k):
        result = real(*a, **k)
        other = ckpt / "model.safetensors"
        other.write_bytes(other.read_bytes())  # another tool rewrote the shard (same bytes, new file stamp)
        os.utime(other, ns=(1, 1))
        return result

    monkeypatch.setattr(job, "unlearn", rewrite_then_run)
    before = tree(ckpt)
    run_error(capsys, ["apply", str(ckpt), str(forget), "--steps", "2"], "changed on disk", status=6)
    assert tree(ckpt) == before


def test_unknown_subcommand_exits_nonzero():
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_demo_folder_guard(capsys, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    run_error(capsys, ["demo", "--workdir", str(tmp_path / "mine")], "not a fastunlearn demo folder")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"
    shutil.rmtree(tmp_path / "mine")
