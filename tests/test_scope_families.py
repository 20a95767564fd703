"""`--scope vision:K` on the families whose tower is LLaVA's (LLaVA-NeXT, LLaVA-OneVision, LLaVA-NeXT-Video,
Aya Vision): CLIP or SigLIP layers read at one layer, run on every tile of a picture; and on those that read
SigLIP's last hidden state after its post-LayerNorm (PaliGemma, Gemma 3)."""
import re

import pytest
import torch

from fastunlearn.batches import make_batches
from fastunlearn.data import read_folder
from fastunlearn.forward import score
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.worlds import people as world

import tiny_families as tf
from test_scope import scored

FAMILIES = ["llava_next", "llava_onevision", "llava_next_video", "aya_vision"]
SIGLIP_LAST = ["paligemma", "gemma3", "idefics3", "smolvlm", "idefics2", "deepseek_vl"]
READ_LAST = SIGLIP_LAST + ["internvl"]  # families whose LLM reads the last hidden state


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
    vision = config["vision_config"]
    return config.get("vision_feature_layer", -1) % ((vision.get("depth") or vision["num_hidden_layers"]) + 1)


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
    assert not torch.equal(reweighted, plain)  # the post-LayerNorm is applied, not skipped (Idefics2's resampler: barely)
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


@pytest.mark.parametrize("family", FAMILIES + READ_LAST + ["qwen2_5_vl", "qwen3_vl", "glm4v", "mistral3"])
def test_apply_edits_the_layer_and_the_byte_proof_names_it(family, tmp_path_factory, tmp_path):
    """apply --scope vision:1 changes the connector and the edited tower layer, nothing else."""
    import json

    checkpoint = tiny(family, tmp_path_factory)
    report = apply_vision_1(checkpoint, tmp_path)
    stem = report["byte_proof"]["may_change"][-1]
    read = read_layers(json.loads((checkpoint / "config.json").read_text()))
    assert re.search(rf"\.(layers|layer|blocks)\.{read - 1}\.$", stem)  # InternViT: `layer`, Qwen and GLM: `blocks`
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


def test_a_padded_tile_is_refused_in_one_line(tmp_path_factory, pictures):
    """The edited layers run without an attention mask, so a sub-image with padding patches is refused, not
    attended to."""
    from fastunlearn.errors import UserError
    from PIL import Image

    loaded = open_checkpoint(tiny("idefics3", tmp_path_factory), torch.device("cpu"), scope=1)
    pixel = loaded.adapter.pixel_inputs(loaded.processor, Image.open(pictures[0].image).convert("RGB"))
    assert loaded.adapter.vision_features(loaded.model, pixel).shape[0] > 0  # unpadded: cached
    pixel["pixel_attention_mask"][:, 0, :, 4:] = False  # the right half of the first sub-image: padding
    with pytest.raises(UserError, match="tiles hold padding") as e:
        loaded.adapter.vision_features(loaded.model, pixel)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mean_pooling,read", [(True, -1), (False, -1), (False, -2)])
def test_internvit_layers_then_what_get_image_features_does(mean_pooling, read, tmp_path, pictures):
    """InternVL: each tile's input to the edited layer (CLS token included), run through it as a function of its
    master, then the final LayerNorm (only where the LLM reads the last hidden state and the tower has one), the
    CLS drop and the pixel shuffle, gives the model's own NLLs; perturbing the layer moves the answers."""
    torch.manual_seed(0)
    model, parts = tf.FAMILIES["internvl"]()
    model.config.vision_config.use_mean_pooling, model.config.vision_feature_layer = mean_pooling, read
    torch.manual_seed(0)
    checkpoint = tf.save(type(model)(model.config), parts, tmp_path / "internvl")
    _, _, _, plain = scored(checkpoint, 0, pictures)
    loaded, samples, _, scoped = scored(checkpoint, 1, pictures)
    torch.testing.assert_close(scoped, plain, rtol=1e-5, atol=1e-6)
    layers = loaded.model.config.vision_config.num_hidden_layers
    assert [i for i, _ in loaded.adapter.edited] == [read % (layers + 1) - 1]
    has_norm = isinstance(loaded.adapter.tower_after, torch.nn.LayerNorm)
    assert has_norm == (not mean_pooling and read == -1)
    if has_norm:
        with torch.no_grad():
            loaded.adapter.tower_after.weight.mul_(0.5)
        reweighted = score(loaded, master_params(loaded), make_batches(loaded, samples, 8))["nll"]
        assert not torch.equal(reweighted, plain)  # the LayerNorm is applied, not skipped
    *_, moved = scored(checkpoint, 1, pictures, perturb=0.05)
    assert not torch.allclose(moved, plain)


@pytest.mark.parametrize("k", [1, 2])
def test_qwen3_vl_blocks_feed_the_deepstack_mergers_that_read_them(k, tmp_path_factory, pictures):
    """Qwen3-VL (deepstack mergers read blocks 0 and 1 of 2): with the last block edited, merger 0's input is
    cached and merger 1 reads the edited block's output; with both edited, both read them. The model's own
    NLLs either way; perturbing the blocks moves them."""
    checkpoint = tiny("qwen3_vl", tmp_path_factory)
    _, _, _, plain = scored(checkpoint, 0, pictures)
    loaded, samples, _, scoped = scored(checkpoint, k, pictures)
    torch.testing.assert_close(scoped, plain, rtol=1e-5, atol=1e-6)
    assert [i for i, _ in loaded.adapter.edited] == list(range(2 - k, 2))
    *_, moved = scored(checkpoint, k, pictures, perturb=0.05)
    assert not torch.allclose(moved, plain)


@pytest.mark.parametrize("k", [1, 2])
def test_qwen2_5_vl_blocks_within_windows_then_in_spatial_order(k, tmp_path_factory, pictures):
    """Qwen2.5-VL: the edited blocks on each picture's cached input, in the tower's window order (its block 0
    attends within 2x2-group windows, block 1 over the whole picture), then its groups put back in spatial
    order, give the model's own NLLs, several pictures packed in one batch; perturbing the blocks moves them."""
    checkpoint = tiny("qwen2_5_vl", tmp_path_factory)
    _, _, _, plain = scored(checkpoint, 0, pictures)
    loaded, samples, _, scoped = scored(checkpoint, k, pictures)
    torch.testing.assert_close(scoped, plain, rtol=1e-5, atol=1e-6)
    assert [i for i, _ in loaded.adapter.edited] == list(range(2 - k, 2))
    assert loaded.adapter.full_attention == {1}
    *_, moved = scored(checkpoint, k, pictures, perturb=0.05)
    assert not torch.allclose(moved, plain)


@pytest.mark.parametrize("family,read", [("glm4v", None), ("mistral3", -1), ("mistral3", -2)])
def test_rotary_towers_from_the_cached_input_and_its_cos_and_sin(family, read, tmp_path, pictures):
    """GLM-4V (then its post LayerNorm and downsample conv) and Mistral 3's Pixtral (read at its last layer or the
    one before): the edited layer on its cached input and rotary cos and sin gives the model's own NLLs; perturbing
    it moves them."""
    torch.manual_seed(0)
    model, parts = tf.FAMILIES[family]()
    if read is not None:
        model.config.vision_feature_layer = read
    torch.manual_seed(0)
    checkpoint = tf.save(type(model)(model.config), parts, tmp_path / family)
    _, plain_samples, _, plain = scored(checkpoint, 0, pictures)
    loaded, samples, _, scoped = scored(checkpoint, 1, pictures)
    torch.testing.assert_close(scoped, plain, rtol=1e-5, atol=1e-6)
    vision = loaded.model.config.vision_config
    layers = getattr(vision, "depth", None) or vision.num_hidden_layers
    assert [i for i, _ in loaded.adapter.edited] == [(read or -1) % (layers + 1) - 1]
    assert samples[0].features.shape[-1] > vision.hidden_size  # cos and sin cached beside the input
    *_, moved = scored(checkpoint, 1, pictures, perturb=0.05)
    assert not torch.allclose(moved, plain)
