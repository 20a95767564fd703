"""`--scope vision:K` on the families whose tower is LLaVA's (LLaVA-NeXT, LLaVA-OneVision, LLaVA-NeXT-Video,
Aya Vision): CLIP or SigLIP layers read at one layer, run on every tile of a picture."""
import pytest
import torch

from fastunlearn.data import read_folder
from fastunlearn.load import open_checkpoint
from fastunlearn.worlds import people as world

import tiny_families as tf
from test_scope import scored

FAMILIES = ["llava_next", "llava_onevision", "llava_next_video", "aya_vision"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("scope-families")
    world.write_folder(root / "f", (1, 4), 2, seed=3)
    return read_folder(root / "f", "forget")


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    return tf.save(*tf.FAMILIES[request.param](), tmp_path_factory.mktemp(request.param))


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


def test_apply_edits_the_layer_and_the_byte_proof_names_it(checkpoint, tmp_path):
    """apply --scope vision:1 changes the connector and the edited tower layer, nothing else."""
    import json

    from fastunlearn.cli import main

    world.write_folder(tmp_path / "forget", (1,), 2, seed=5)
    world.write_folder(tmp_path / "retain", (2, 3), 1, seed=6)
    out = tmp_path / "out"
    assert main(["apply", str(checkpoint), str(tmp_path / "forget"), "--retain", str(tmp_path / "retain"), "--out",
                 str(out), "--steps", "4", "--views", "0", "--scope", "vision:1", "--no-holdout"]) == 0
    report = json.loads((out / "unlearning_report.json").read_text())
    config = json.loads((checkpoint / "config.json").read_text())
    read = config["vision_feature_layer"] % (config["vision_config"]["num_hidden_layers"] + 1)
    stem = report["byte_proof"]["may_change"][-1]
    assert stem.endswith(f"encoder.layers.{read - 1}.")
    changed = [c["name"] for c in report["changed_tensors"]]
    assert any(stem in n for n in changed) and report["byte_proof"]["all_other_bytes_unchanged"]


def test_a_connector_reading_several_layers_refuses_in_one_line(tmp_path):
    from fastunlearn.errors import UserError

    torch.manual_seed(0)
    ckpt = tf.save(*tf.FAMILIES["vipllava"](), tmp_path / "vipllava")
    with pytest.raises(UserError, match=r"connector reads several tower layers \(\[") as e:
        open_checkpoint(ckpt, torch.device("cpu"), scope=1)
    assert "\n" not in str(e.value)
