"""`--scope vision:K` on the families whose tower is LLaVA's (LLaVA-NeXT, LLaVA-OneVision, LLaVA-NeXT-Video,
Aya Vision): CLIP or SigLIP layers read at one layer, run on every tile of a picture; and on those that read
SigLIP's last hidden state after its post-LayerNorm (PaliGemma, Gemma 3)."""
import pytest
import torch

from fastunlearn.batches import make_batches
from fastunlearn.data import read_folder
from fastunlearn.forward import score
from fastunlearn.load import open_checkpoint
from fastunlearn.worlds import people as world

import tiny_families as tf
from test_scope import scored

FAMILIES = ["llava_next", "llava_onevision", "llava_next_video", "aya_vision"]
SIGLIP_LAST = ["paligemma", "gemma3"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("scope-families")
    world.write_folder(root / "f", (1, 4), 2, seed=3)
    return read_folder(root / "f", "forget")


def tiny(family, tmp_path_factory):
    torch.manual_seed(0)
    return tf.save(*tf.FAMILIES[family](), tmp_path_factory.mktemp(family))


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=SIGLIP_LAST)
def siglip_checkpoint(request, tmp_path_factory):
    return tiny(request.param, tmp_path_factory)


def read_layers(config: dict) -> int:
    """How many tower layers the LLM's features pass through (no vision_feature_layer: all of them)."""
    return config.get("vision_feature_layer", -1) % (config["vision_config"]["num_hidden_layers"] + 1)


def test_tiles_through_the_edited_layers_are_the_tower(checkpoint, pictures):
    """Every tile's input to the edited layer, cached and run through that layer as a function of its
    master, then the select strategy and the connector, gives the model's own NLLs; the edited layer is
    the last one the LLM reads; perturbing it moves the answers."""
    _, plain_samples, _, plain = scored(checkpoint, 0, pictures)
    loaded, samples, _, scoped = scored(checkpoint, 1, pictures)
    torch.testing.assert_close(scoped, plain, rtol=1e-5, atol=1e-6)
    config = loaded.model.config
    read = config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1)
    assert [i for i, _ in loaded.adapter.edited] == [read - 1]
    assert len(loaded.adapter.edited_stems) == 1
    assert any(loaded.adapter.edited_stems[0] in n for n in loaded.names.values())
    cls = config.vision_feature_select_strategy == "default"  # the CLS token is cached: attention needs it
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2  # a tile's
    tiles = plain_samples[0].features.shape[0] // patches
    assert samples[0].features.shape[0] == tiles * (patches + cls)
    assert tiles > 1 or config.model_type == "aya_vision"  # anyres: a base tile and the grid's
    *_, moved = scored(checkpoint, 1, pictures, perturb=0.05)
    assert not torch.allclose(moved, plain)


def test_siglip_layers_then_the_post_layernorm_are_the_tower(siglip_checkpoint, pictures):
    """Each crop's input to the last SigLIP layer, run through it as a function of its master and then
    through the post-LayerNorm as stored, gives the model's own NLLs (without the LayerNorm they differ);
    perturbing the layer moves the answers."""
    _, plain_samples, _, plain = scored(siglip_checkpoint, 0, pictures)
    loaded, samples, params, scoped = scored(siglip_checkpoint, 1, pictures)
    torch.testing.assert_close(scoped, plain, rtol=1e-5, atol=1e-6)
    layers = loaded.model.config.vision_config.num_hidden_layers
    assert [i for i, _ in loaded.adapter.edited] == [layers - 1]
    assert samples[0].features.shape == plain_samples[0].features.shape  # SigLIP has no CLS token
    assert not torch.allclose(samples[0].features, plain_samples[0].features)  # cached before the last layer
    norm = loaded.adapter.tower_after
    with torch.no_grad():
        weight = norm.weight.clone()
        norm.weight.mul_(torch.linspace(0.5, 1.5, len(weight)))  # not a uniform scale: Gemma 3's RMSNorm undoes that
        reweighted = score(loaded, params, make_batches(loaded, samples, 8))["nll"]
        norm.weight.copy_(weight)
    assert not torch.allclose(reweighted, plain)  # the post-LayerNorm is applied, not skipped
    *_, moved = scored(siglip_checkpoint, 1, pictures, perturb=0.05)
    assert not torch.allclose(moved, plain)


def apply_vision_1(checkpoint, tmp_path) -> dict:
    import json

    from fastunlearn.cli import main

    world.write_folder(tmp_path / "forget", (1,), 2, seed=5)
    world.write_folder(tmp_path / "retain", (2, 3), 1, seed=6)
    out = tmp_path / "out"
    assert main(["apply", str(checkpoint), str(tmp_path / "forget"), "--retain", str(tmp_path / "retain"), "--out",
                 str(out), "--steps", "4", "--views", "0", "--scope", "vision:1", "--no-holdout"]) == 0
    return json.loads((out / "unlearning_report.json").read_text())


@pytest.mark.parametrize("family", FAMILIES + SIGLIP_LAST)
def test_apply_edits_the_layer_and_the_byte_proof_names_it(family, tmp_path_factory, tmp_path):
    """apply --scope vision:1 changes the connector and the edited tower layer, nothing else."""
    import json

    checkpoint = tiny(family, tmp_path_factory)
    report = apply_vision_1(checkpoint, tmp_path)
    read = read_layers(json.loads((checkpoint / "config.json").read_text()))
    stem = report["byte_proof"]["may_change"][-1]
    assert stem.endswith(f"encoder.layers.{read - 1}.")
    changed = [c["name"] for c in report["changed_tensors"]]
    assert any(stem in n for n in changed) and report["byte_proof"]["all_other_bytes_unchanged"]


def test_hub_names_with_the_vision_model_level(tmp_path_factory, tmp_path):
    """Hub files keep CLIP's and SigLIP's `vision_model.` level, which transformers 5 drops in memory: the
    edited layer is found under its stored name, changed, and the byte proof accepts it."""
    from safetensors.torch import load_file, save_file

    checkpoint = tiny("paligemma", tmp_path_factory)
    stored = load_file(checkpoint / "model.safetensors")
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
           for k, v in stored.items()}
    assert len(hub) == len(stored) and any(".vision_model.encoder.layers." in k for k in hub)
    save_file(hub, checkpoint / "model.safetensors", metadata={"format": "pt"})
    report = apply_vision_1(checkpoint, tmp_path)
    changed = [c["name"] for c in report["changed_tensors"]]
    assert any(n.startswith("vision_tower.vision_model.encoder.layers.1.") for n in changed)
    assert report["byte_proof"]["all_other_bytes_unchanged"]


def test_a_connector_reading_several_layers_refuses_in_one_line(tmp_path):
    from fastunlearn.errors import UserError

    torch.manual_seed(0)
    ckpt = tf.save(*tf.FAMILIES["vipllava"](), tmp_path / "vipllava")
    with pytest.raises(UserError, match=r"connector reads several tower layers \(\[") as e:
        open_checkpoint(ckpt, torch.device("cpu"), scope=1)
    assert "\n" not in str(e.value)
