"""The edit's room (`--scope vision:K`) and the anchor term."""
import hashlib

import pytest
import torch

from fastunlearn import anchor
from fastunlearn.batches import make_batches
from fastunlearn.config import Config
from fastunlearn.data import read_folder
from fastunlearn.errors import UserError
from fastunlearn.features import cache_samples, drop_vision_tower
from fastunlearn.forward import score
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.scope import tower_layers
from fastunlearn.verification import compare_checkpoints
from fastunlearn.worlds import people as world

from conftest import asset
import tiny_families as tf


def test_scope_names():
    assert tower_layers("connector") == 0 and tower_layers("vision:2") == 2
    for bad in ("vision", "vision:0", "vision:-1", "tower:1", "", "vision:1x"):
        with pytest.raises(UserError, match="--scope"):
            Config(scope=bad).check()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("scope")
    world.write_folder(root / "f", (1, 4), 2, seed=3)
    return read_folder(root / "f", "forget")


def scored(ckpt, k, items, perturb=0.0):
    """The checkpoint opened with k tower layers to edit, its pictures cached, the masters (the tower
    layers' perturbed by `perturb` x N(0, 1)) and the NLLs of the items under them."""
    loaded = open_checkpoint(ckpt, torch.device("cpu"), scope=k)
    samples = cache_samples(loaded, items, "f")
    drop_vision_tower(loaded)
    params = master_params(loaded)
    gen = torch.Generator().manual_seed(0)
    for key in params:
        if key.startswith("tower."):
            params[key] += perturb * torch.randn(params[key].shape, generator=gen)
    return loaded, samples, params, score(loaded, params, make_batches(loaded, samples, 8))["nll"]


@pytest.mark.parametrize("family,k", [("llava", 1), ("qwen2_vl", 1), ("qwen2_vl", 2)])
def test_edited_layers_from_their_cached_input_are_the_tower(family, k, pictures):
    """Features cached at the first edited layer's input, run through the edited layers as functions of
    their masters, give the model's own NLLs; the masters are the stored tensors of exactly those layers;
    and they are live: changing them changes the answers."""
    _, _, _, plain = scored(asset(family), 0, pictures)
    loaded, samples, params, scoped = scored(asset(family), k, pictures)
    torch.testing.assert_close(scoped, plain, rtol=1e-5, atol=1e-6)
    assert all(loaded.adapter.is_projector_name(n) for n in loaded.names.values())  # all in the edit's room
    stems = loaded.adapter.edited_stems
    assert len(stems) == k and sum(any(s in n for s in stems) for n in loaded.names.values()) > 0
    read = {"llava": 1, "qwen2_vl": 2}[family]  # the LLM reads LLaVA's layer -2 of 2, Qwen2-VL's last of 2
    assert [i for i, _ in loaded.adapter.edited] == list(range(read - k, read))
    assert samples[0].features.shape[0] == (17 if family == "llava" else 16)  # LLaVA: CLS kept for attention
    *_, moved = scored(asset(family), k, pictures, perturb=0.05)
    assert not torch.allclose(moved, plain)


def test_scope_beyond_the_layers_read_or_unsupported_family_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"vision:2: the LLM reads this llava checkpoint's tower after its layer 1"):
        open_checkpoint(asset("llava"), torch.device("cpu"), scope=2)
    torch.manual_seed(0)
    ckpt = tf.save(*tf.FAMILIES["mllama"](), tmp_path / "mllama")
    with pytest.raises(UserError, match="mllama connector reads several tower layers") as e:
        open_checkpoint(ckpt, torch.device("cpu"), scope=1)
    assert "\n" not in str(e.value)


def test_byte_proof_allows_the_edited_layers_only_under_their_scope(tmp_path, fresh):
    """A checkpoint whose tower layer changed passes the byte proof under the scope that allows that
    layer, and fails it under --scope connector and under a scope that allows other layers."""
    from safetensors.torch import load_file, save_file

    src = fresh(asset("qwen2_vl"), "orig")
    edited = fresh(asset("qwen2_vl"), "edited")
    path = next(edited.glob("*.safetensors"))
    tensors = load_file(path)
    name = next(n for n in tensors if "blocks.1.mlp" in n and n.endswith("weight"))
    tensors[name] = tensors[name] + 1
    save_file(tensors, path, metadata={"format": "pt"})
    assert compare_checkpoints(src, edited, "vision:1")["only_projector_changed"]
    assert compare_checkpoints(src, edited, "vision:2")["only_projector_changed"]
    for scope in ("connector",):
        result = compare_checkpoints(src, edited, scope)
        assert not result["only_projector_changed"] and not result["all_other_bytes_unchanged"]
        assert result["scope"]["may_change"] == ["visual.merger."]


def test_anchor_term_is_zero_at_the_original_and_relative(pictures):
    loaded, samples, params, _ = scored(asset("llava"), 1, pictures)
    kept = anchor.pictures(samples)
    assert len(kept) == len({it.image for it in pictures})
    anchors = anchor.original_outputs(loaded, params, kept)
    assert float(anchor.anchor_loss(loaded, params, anchors, 0, 3)) == 0.0
    moved = {n: (p * 1.1 if n == "linear_2.weight" else p).requires_grad_(True) for n, p in params.items()}
    loss = anchor.anchor_loss(loaded, moved, anchors, 0, len(kept))
    # the second linear scaled by 1.1 moves every token by 0.1 (W x) of its (W x + b)
    out = [loaded.adapter.project_each(loaded.model, params, [s.features], [s.grid])[0] for s in kept]
    bias = params["linear_2.bias"]
    expected = torch.stack([((0.1 * (o - bias)) ** 2).sum() / (o ** 2).sum() for o in out]).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-7)
    grads = torch.autograd.grad(loss, [moved["linear_2.weight"], moved["tower.0.mlp.fc1.weight"]])
    assert all(g.abs().sum() > 0 for g in grads)


def test_apply_with_a_tower_layer_verify_and_patch(fresh, folders, tmp_path, capsys):
    """apply --scope vision:1 edits the last block Qwen2-VL's merger reads as well as the merger; the
    report and verify --scope vision:1 accept exactly that; verify under --scope connector fails the
    byte proof (exit 3); the delta patches another copy to the same bytes."""
    import json

    from fastunlearn.cli import main

    src = asset("qwen2_vl")
    out, delta = tmp_path / "out", tmp_path / "delta.safetensors"
    assert main(["apply", str(src), str(folders / "forget"), "--retain", str(folders / "retain"), "--out", str(out),
                 "--delta", str(delta), "--steps", "6", "--views", "0", "--scope", "vision:1", "--anchor-weight", "10",
                 "--no-holdout"]) == 0
    report = json.loads((out / "unlearning_report.json").read_text())
    changed = [c["name"] for c in report["changed_tensors"]]
    assert any(n.startswith(("visual.blocks.1.", "model.visual.blocks.1.")) for n in changed)
    assert any("merger" in n for n in changed) and not any("blocks.0." in n for n in changed)
    assert report["byte_proof"]["all_other_bytes_unchanged"] and report["byte_proof"]["may_change"] == [
        "visual.merger.", "visual.blocks.1."]
    assert "visual.blocks.1." in capsys.readouterr().out  # apply's summary names what may change
    assert report["config"]["scope"] == "vision:1" and report["config"]["anchor_dir"] is None

    common = ["verify", str(src), str(out), str(folders / "forget"), "--no-probes", "--device", "cpu", "--json"]
    assert main(common + ["--scope", "vision:1"]) == 0
    capsys.readouterr()
    assert main(common) == 3
    failed = [c for c in json.loads(capsys.readouterr().out)["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == ["byte proof: only --scope connector tensors changed"]
    assert "blocks.1." in failed[0]["detail"]

    target = fresh(src)
    assert main(["patch", str(target), str(delta)]) == 0
    assert (target / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_anchor_folder_needs_a_weight_and_pictures(tmp_path, folders):
    from fastunlearn.applying import apply

    with pytest.raises(UserError, match="--anchor DIR needs --anchor-weight"):
        apply(asset("llava"), folders / "forget", dry_run=True, config=Config(anchor_dir=str(folders / "retain")))
    fast = dict(steps=3, views=0, fisher_samples=4, holdout=False)
    report = apply(asset("llava"), folders / "forget", dry_run=True,
                   config=Config(**fast, anchor_dir=str(folders / "heldout"), anchor_weight=1.0))
    assert report["config"]["anchor_dir"] == hashlib.sha256(str((folders / "heldout").resolve()).encode()).hexdigest()
    plain = apply(asset("llava"), folders / "forget", dry_run=True, config=Config(**fast))
    # the folder's pictures anchor: the same first step (the term is 0 at the original), then a larger loss
    assert report["loss_curve"][0] == plain["loss_curve"][0] and report["loss_curve"][2] > plain["loss_curve"][2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in the anchor folder"):
        apply(asset("llava"), folders / "forget", dry_run=True,
              config=Config(anchor_dir=str(tmp_path / "empty"), anchor_weight=1.0))
