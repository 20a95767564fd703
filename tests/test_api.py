"""The public Python API, used as a notebook or pipeline would: only the names fastunlearn exports.

Also the verify gates: exit status 0 only when the byte proof holds and the thresholds asked for
pass, 3 when the byte proof fails, 4 when a threshold fails, with each check stated in the JSON."""
import json
import shutil
import struct

import pytest

import fastunlearn
from fastunlearn.cli import main  # the CLI is a thin layer over the same API

from conftest import asset

FAST = fastunlearn.Config(steps=4, views=0, fisher_samples=8, device="cpu")


def flip_byte(ckpt, tensor_name):
    """Flip one byte inside a stored tensor, found through the file's own header."""
    path = ckpt / "model.safetensors"
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, _ = json.loads(f.read(n))[tensor_name]["data_offsets"]
        f.seek(8 + n + begin + 3)
        byte = f.read(1)
        f.seek(8 + n + begin + 3)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory, folders):
    """fastunlearn.apply on the demo LLaVA, written to a new folder, with a delta."""
    root = tmp_path_factory.mktemp("api")
    notes = []
    report = fastunlearn.apply(asset("llava"), folders / "forget", folders / "retain", out=root / "out",
                               delta_path=root / "delta.safetensors", config=FAST, log=notes.append)
    return root, report


def test_public_names_only():
    assert set(fastunlearn.__all__) >= {"apply", "verify", "patch", "Config", "UserError", "__version__"}
    for name in fastunlearn.__all__:
        assert getattr(fastunlearn, name) is not None
    assert issubclass(fastunlearn.WrongCheckpoint, fastunlearn.UserError)
    with pytest.raises(AttributeError):
        fastunlearn.not_a_public_name  # noqa: B018


def test_apply_returns_a_plain_report(unlearned):
    root, report = unlearned
    json.dumps({k: v for k, v in report.items()})  # plain data all the way down
    assert report["byte_proof"]["all_other_bytes_unchanged"] is True
    assert report["config"]["steps"] == 4
    assert (root / "out" / "unlearning_report.json").exists()


def test_bad_input_raises_user_error(tmp_path, folders):
    with pytest.raises(fastunlearn.UserError, match="not a folder"):
        fastunlearn.apply(tmp_path / "missing", folders / "forget", config=FAST)
    with pytest.raises(fastunlearn.UserError, match="--method"):
        fastunlearn.apply(asset("llava"), folders / "forget", config=fastunlearn.Config(method="nope"))


def test_patch_applies_the_delta_to_a_copy(unlearned, tmp_path):
    root, _ = unlearned
    copy = shutil.copytree(asset("llava"), tmp_path / "copy")
    result = fastunlearn.patch(copy, root / "delta.safetensors")
    assert result["status"] == "patched"
    assert (copy / "model.safetensors").read_bytes() == (root / "out" / "model.safetensors").read_bytes()
    assert fastunlearn.patch(copy, root / "delta.safetensors")["status"] == "already patched"
    other = shutil.copytree(asset("llava"), tmp_path / "other")
    flip_byte(other, "multi_modal_projector.linear_1.weight")  # neither the original nor the patched bytes
    with pytest.raises(fastunlearn.WrongCheckpoint, match="another checkpoint"):
        fastunlearn.patch(other, root / "delta.safetensors")


def test_verify_passes_and_states_each_check(unlearned, folders):
    root, _ = unlearned
    result = fastunlearn.verify(asset("llava"), root / "out", folders / "forget", folders / "retain", device="cpu",
                                probes=False, max_forget_accuracy=1.0, max_retain_drop=1.0)
    assert result["passed"] is True
    names = [c["check"] for c in result["checks"]]
    assert any(n.startswith("byte proof: only --scope connector tensors changed") for n in names)
    assert sum(n.startswith("threshold:") for n in names) == 2
    assert all(c["passed"] for c in result["checks"])
    for c in result["checks"]:  # each accuracy threshold states its 95% interval and item count
        if c["check"].startswith("threshold:"):
            assert c["interval"][0] <= c["value"] <= c["interval"][1] and c["items"] > 0 and "interval" in c["detail"]


def test_verify_threshold_failure_exits_4(unlearned, folders, capsys):
    root, _ = unlearned
    # before the job the retain pictures are answered; a drop limit below zero cannot hold
    rc = main(["verify", str(asset("llava")), str(root / "out"), str(folders / "forget"), "--retain",
               str(folders / "retain"), "--no-probes", "--device", "cpu", "--max-retain-drop", "-0.5"])
    captured = capsys.readouterr()
    assert rc == 4, captured.err
    assert "FAIL  threshold: kept pictures, drop of exact-answer accuracy" in captured.out
    assert "verify failed" in captured.err and "\n" not in captured.err.strip()


def test_verify_fails_when_a_vision_tower_byte_flips(unlearned, folders, tmp_path, capsys):
    root, _ = unlearned
    bad = shutil.copytree(root / "out", tmp_path / "bad")
    flip_byte(bad, "vision_tower.embeddings.patch_embedding.weight")
    rc = main(["verify", str(asset("llava")), str(bad), str(folders / "forget"), "--no-probes", "--device", "cpu",
               "--json"])
    captured = capsys.readouterr()
    assert rc == 3
    result = json.loads(captured.out)
    failed = [c for c in result["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == ["byte proof: only --scope connector tensors changed"]
    assert "vision_tower" in failed[0]["detail"]
    assert result["passed"] is False


def test_verify_fails_when_a_file_is_added_or_missing(unlearned, folders, tmp_path):
    root, _ = unlearned
    odd = shutil.copytree(root / "out", tmp_path / "odd")
    (odd / "extra.bin").write_bytes(b"x")
    (odd / "generation_config.json").unlink()
    result = fastunlearn.verify(asset("llava"), odd, folders / "forget", device="cpu", probes=False)
    check = next(c for c in result["checks"] if c["check"] == "byte proof: no file missing or added")
    assert not check["passed"] and "extra.bin" in check["detail"] and "generation_config.json" in check["detail"]


def test_verify_threshold_needs_its_data(unlearned, folders):
    root, _ = unlearned
    with pytest.raises(fastunlearn.UserError, match="--max-retain-drop needs --retain"):
        fastunlearn.verify(asset("llava"), root / "out", folders / "forget", max_retain_drop=0.02)
