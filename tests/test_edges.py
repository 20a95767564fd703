"""The edges a real checkpoint hits, tried through the CLI on tiny checkpoints of the real transformers
classes (tiny_families.py): processor settings missing from the checkpoint, a checkpoint whose
connector reaches no answer, and picture tiling switched on as the Hub ships it, on pictures that are
not square."""
import json
import shutil

import pytest
import torch
from PIL import Image

import tiny_families as tf
from fastunlearn.batches import make_batches
from fastunlearn.cli import main
from fastunlearn.data import Item, load_image
from fastunlearn.features import cache_samples
from fastunlearn.forward import answer_hidden
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.worlds import people as world
from test_families import check_only_connector_changed


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """built(family, tiling=False) -> a pristine tiny checkpoint folder, built once per session."""
    cache = {}

    def make(family, tiling=False):
        if (family, tiling) not in cache:
            cache[family, tiling] = tf.build(family, tmp_path_factory.mktemp(f"edge-{family}-{tiling}"), tiling=tiling)
        return cache[family, tiling]

    return make


@pytest.fixture(scope="session")
def pictures(tmp_path_factory):
    """One picture per person to forget (none held out: the job runs only the given settings), landscape
    and portrait as photos are."""
    root = tmp_path_factory.mktemp("edge-world")
    world.write_folder(root / "forget", (1, 4), 1, seed=21)
    for i, path in enumerate(sorted(root.rglob("*.png"))):
        Image.open(path).resize((96, 48) if i % 2 == 0 else (48, 80)).save(path)
    return root


def apply(ckpt, pictures, out, *extra):
    return main(["apply", str(ckpt), str(pictures / "forget"), "--out", str(out), "--steps", "1", "--views", "0", *extra])


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastunlearn: error: "), err
    return err[0]


# -- a processor that fails: one line, not a traceback


def drop_setting(ckpt, key):
    path = ckpt / "processor_config.json"
    settings = json.loads(path.read_text())
    del settings[key]
    path.write_text(json.dumps(settings))


@pytest.mark.parametrize("break_it, named", [
    (lambda ckpt: drop_setting(ckpt, "num_image_tokens"), ["TypeError", "num_image_tokens is not set",
                                                           "processor_config.json"]),
    (lambda ckpt: (ckpt / "chat_template.jinja").write_text("{{ messages[3]['content'] }}"), ["chat template"]),
], ids=["num_image_tokens-missing", "chat-template-broken"])
def test_a_processor_error_is_one_line_naming_checkpoint_processor_and_setting(break_it, named, built, pictures,
                                                                                 tmp_path, capsys):
    ckpt = shutil.copytree(built("llava_onevision"), tmp_path / "ckpt")
    break_it(ckpt)
    capsys.readouterr()
    assert apply(ckpt, pictures, tmp_path / "out") == 2
    line = one_line_error(capsys)
    assert str(ckpt) in line and "LlavaOnevisionProcessor" in line, line
    assert all(n in line for n in named), line
    assert not (tmp_path / "out").exists()


# -- processor settings missing: the token counts come from config.json


@pytest.mark.parametrize("family, remove", [
    ("smolvlm", None), ("internvl", None), ("mistral3", None),  # no processor_config.json at all
    ("idefics3", "image_seq_len"),  # processor_config.json without the key (it holds the image processor)
])
def test_token_counts_follow_config_json_when_processor_settings_are_missing(family, remove, built, pictures, tmp_path):
    ckpt = shutil.copytree(built(family), tmp_path / "ckpt")
    if remove is None:
        (ckpt / "processor_config.json").unlink()
    else:
        drop_setting(ckpt, remove)
    report = apply(ckpt, pictures, tmp_path / "out") == 0 and json.loads((tmp_path / "out" / "unlearning_report.json").read_text())
    assert report, "apply failed"
    check_only_connector_changed(family, ckpt, tmp_path / "out", report)


# -- a connector that reaches no answer: the job says so and writes nothing


def test_a_job_that_changes_nothing_fails_and_writes_nothing(built, pictures, tmp_path, capsys):
    """Mllama with its cross-attention gates at 0 (as initialised): pictures reach no answer."""
    ckpt = built("mllama_zero_gates")
    capsys.readouterr()
    assert apply(ckpt, pictures, tmp_path / "out") == 2
    line = one_line_error(capsys)
    assert "gradient with respect to the connector is zero" in line and "cross-attention gate" in line, line
    assert "nothing was written" in line and not (tmp_path / "out").exists()
    # a dry run stops the same way, before its report
    assert main(["apply", str(ckpt), str(pictures / "forget"), "--dry-run", "--report", str(tmp_path / "r.json"),
                 "--steps", "1", "--views", "0"]) == 2
    assert "gradient with respect to the connector is zero" in one_line_error(capsys)
    assert not (tmp_path / "r.json").exists()


# -- tiling as the Hub ships it


def processor_reference(loaded, family, picture, prompt):
    """input_ids and hidden states of the family's own processor call and model forward."""
    kwargs = {k: v for k, v in tf.HUB_TILING[family].items() if k.startswith("do_") or k.startswith("pan_")}
    inputs = loaded.processor(text=[prompt], images=[load_image(picture)], return_tensors="pt", **kwargs)
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    inputs.pop("num_crops", None)
    if family == "gemma3":
        inputs.setdefault("token_type_ids", inputs.pop("mm_token_type_ids", None))
    with torch.no_grad():
        hidden = loaded.model.model(**inputs, use_cache=False).last_hidden_state[0]
    return inputs["input_ids"][0], hidden


@pytest.mark.parametrize("family", list(tf.HUB_TILING))
def test_hub_tiling_on_pictures_that_are_not_square(family, built, pictures, tmp_path):
    """Sub-images / anyres grids / pan-and-scan crops on: the job's token ids and hidden states are the
    family's own processor call and forward (SmolVLM's processor cannot be built here: Idefics3 runs
    the same code), and `apply` changes only the connector."""
    ckpt = built(family, tiling=True)
    if family != "smolvlm":
        loaded = open_checkpoint(ckpt, torch.device("cpu"))
        tiles = 0
        for picture in sorted((pictures / "forget").rglob("*.png")):
            item = Item(picture, world.VISUAL_QUESTION, "Bruno Tanaka", "")
            sample = cache_samples(loaded, [item], "test")[0]
            hidden = answer_hidden(loaded, master_params(loaded), make_batches(loaded, [sample], 1)[0])
            prompt = loaded.adapter.prompt(loaded.processor, item.question, True) + " " + item.answer
            ids, reference = processor_reference(loaded, family, picture, prompt)
            assert torch.equal(ids, sample.input_ids), picture
            torch.testing.assert_close(hidden, reference[sample.answer_start - 1 : len(ids) - 1], atol=1e-5, rtol=1e-4)
            tiles += loaded.adapter.pixel_inputs(loaded.processor, load_image(picture))["pixel_values"].shape[:-3].numel()
        assert tiles > 2, "no picture was tiled"
    report = apply(ckpt, pictures, tmp_path / "out") == 0 and json.loads((tmp_path / "out" / "unlearning_report.json").read_text())
    assert report, "apply failed"
    check_only_connector_changed(family, ckpt, tmp_path / "out", report)
