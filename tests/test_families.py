"""Every supported image-text-to-text family end to end, on tiny checkpoints of the real transformers
classes (random weights, built offline once per session): `apply` through the CLI changes only the
connector's tensors (every other tensor byte-identical), the forget NLL rises, and `verify` agrees.
The adapter's forward (cached features -> connector -> the family's own multimodal forward) equals
the model's own forward on the pixels."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny_families as tf
from fastunlearn import safetensors_io as st
from fastunlearn.worlds import people as world
from fastunlearn.cli import main
from fastunlearn.data import Item, read_folder
from fastunlearn.batches import make_batches
from fastunlearn.features import _pixels, cache_samples, greedy_answers
from fastunlearn.forward import answer_hidden
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.mask import fisher_diagonal, fisher_diagonal_loop

# family -> stored connector tensors (legacy layout names; the "model." layout prefixes them with "model.")
CONNECTOR = {
    "llava_next": r"(multi_modal_projector\.linear_[12]\.(weight|bias)|image_newline)",
    "llava_onevision": r"(multi_modal_projector\.linear_[12]\.(weight|bias)|image_newline)",
    "mistral3": r"multi_modal_projector\.(norm\.weight|patch_merger\.merging_layer\.weight|linear_[12]\.weight)",
    "internvl": r"multi_modal_projector\.(layer_norm|linear_[12])\.(weight|bias)",
    "paligemma": r"multi_modal_projector\.linear\.(weight|bias)",
    "gemma3": r"multi_modal_projector\.(mm_input_projection_weight|mm_soft_emb_norm\.weight)",
    "idefics3": r"connector\.modality_projection\.proj\.weight",
    "smolvlm": r"connector\.modality_projection\.proj\.weight",
    "qwen2_5_vl": r"visual\.merger\.(ln_q\.weight|mlp\.[02]\.(weight|bias))",
    "mllama": r"multi_modal_projector\.(weight|bias)",
    "aya_vision": r"multi_modal_projector\.(layernorm|linear_[12])\.(weight|bias)",
    "deepseek_vl": r"aligner\.linear[12]\.(weight|bias)",
    "glm4v": r"visual\.merger\.(proj|post_projection_norm|gate_proj|up_proj|down_proj)\.(weight|bias)",
    "idefics2": r"connector\.(modality_projection|perceiver_resampler)\..+",
    "qwen3_vl": r"visual\.(merger|deepstack_merger_list\.[01])\.(norm|linear_fc[12])\.(weight|bias)",
}
CONNECTOR["llava_next_video"] = CONNECTOR["llava_next"]
CONNECTOR["qwen3_vl_moe"] = CONNECTOR["qwen3_vl"]
CONNECTOR["glm4v_moe"] = CONNECTOR["glm4v"]
CONNECTOR["vipllava"] = r"multi_modal_projector\.(projector_layernorm|linear_[12])\.(weight|bias)"
FAMILIES = list(CONNECTOR)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(family, dtype=None, shard=None, layout="saved") -> a pristine checkpoint folder, built once.
    layout "model": every stored tensor renamed to its in-memory name (the `model.*` Hub layout)."""
    built = {}

    def make(family, dtype=None, shard=None, layout="saved"):
        key = (family, dtype, shard, layout)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{family}-{str(dtype)[6:]}-{shard}-{layout}")
            tf.build(family, out, dtype, shard)
            if layout == "model":
                to_model_layout(out)
            built[key] = out
        return built[key]

    return make


def to_model_layout(folder):
    """Rewrite a single-file checkpoint with the in-memory (`model.*`) tensor names."""
    from transformers import AutoModelForImageTextToText

    with safe_open(folder / "model.safetensors", "pt") as f:
        stored_dtype = f.get_tensor(next(iter(f.keys()))).dtype
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=stored_dtype)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("families-world")
    world.write_folder(root / "forget", (1, 4), 2, seed=11)
    world.write_folder(root / "retain", (0, 2), 2, seed=12)
    return root


def tensors(folder):
    out = {}
    for path in st.weight_files(folder):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def run_apply(src, data, out, *extra):
    args = ["apply", str(src), str(data / "forget"), "--retain", str(data / "retain"), "--out", str(out),
            "--steps", "3", "--views", "0", *extra]
    assert main(args) == 0
    return json.loads((out / "unlearning_report.json").read_text())


def check_only_connector_changed(family, src, out, report):
    pattern = re.compile(r"(model\.)?" + CONNECTOR[family])
    before, after = tensors(src), tensors(out)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n].view(torch.uint8) if before[n].dtype == torch.bool
                                                    else before[n], after[n])}
    assert changed, "nothing changed"
    assert all(pattern.fullmatch(n) for n in changed), sorted(changed)
    assert changed == {c["name"] for c in report["changed_tensors"]}
    assert report["byte_proof"]["all_other_bytes_unchanged"] is True
    for f in st.weight_files(src):  # headers (and __metadata__) identical, file sizes identical
        assert st.read_header(f).length == st.read_header(out / f.name).length
        assert f.stat().st_size == (out / f.name).stat().st_size


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_changes_only_the_connector_and_verify_agrees(family, tiny, data, tmp_path):
    src = tiny(family)
    report = run_apply(src, data, tmp_path / "out")
    check_only_connector_changed(family, src, tmp_path / "out", report)
    m = report["metrics"]["forget"]
    assert m["after"]["mean_token_nll"] > m["before"]["mean_token_nll"]

    verified = tmp_path / "verify.json"
    assert main(["verify", str(src), str(tmp_path / "out"), str(data / "forget"), "--retain", str(data / "retain"),
                 "--report", str(verified), "--no-probes"]) == 0
    result = json.loads(verified.read_text())
    changed = result["bytes"]["changed_tensors"]
    assert changed and all(c["projector"] for c in changed)
    assert {c["name"] for c in changed} == {c["name"] for c in report["changed_tensors"]}
    assert result["metrics"]["forget"]["after"]["mean_token_nll"] == pytest.approx(m["after"]["mean_token_nll"], rel=1e-4)


@pytest.mark.parametrize("family, remove, named", [
    ("internvl", ["preprocessor_config.json"], "preprocessor_config.json"),
    ("gemma3", ["processor_config.json"], "preprocessor_config.json"),
    ("smolvlm", ["tokenizer.json", "tokenizer_config.json"], "tokenizer.json"),
])
def test_missing_processor_files_are_named(family, remove, named, tiny, data, tmp_path, capsys):
    ckpt = __import__("shutil").copytree(tiny(family), tmp_path / "ckpt")
    for name in remove:
        (ckpt / name).unlink()
    capsys.readouterr()  # the fixture's own output
    assert main(["apply", str(ckpt), str(data / "forget"), "--out", str(tmp_path / "out"), "--steps", "1",
                 "--views", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["mllama", "qwen3_vl", "idefics2"])
def test_verify_with_probes(family, tiny, data, tmp_path):
    """The relearning and identity probes run on the family's connector (projected tokens of each picture)."""
    src = tiny(family)
    run_apply(src, data, tmp_path / "out")
    verified = tmp_path / "verify.json"
    assert main(["verify", str(src), str(tmp_path / "out"), str(data / "forget"), "--retain", str(data / "retain"),
                 "--report", str(verified)]) == 0
    after = json.loads(verified.read_text())["evaluation"]["after"]
    assert after["probe"]["classes"] == 4 and "steps" in after["relearn"]


@pytest.mark.parametrize("family, dtype, shard, layout", [
    ("mistral3", torch.bfloat16, "60KB", "saved"),
    ("qwen3_vl", torch.bfloat16, "60KB", "saved"),
    ("llava_next", torch.float16, None, "model"),
    ("gemma3", torch.float32, None, "model"),
    ("mllama", torch.bfloat16, None, "model"),
])
def test_other_layouts_and_dtypes(family, dtype, shard, layout, tiny, data, tmp_path):
    """bf16/fp16, sharded, and the `model.*` Hub layout: the connector is found from the headers and
    only its byte ranges change; in place this time."""
    src = tiny(family, dtype, shard, layout)
    if shard:
        assert len(st.weight_files(src)) > 1
    stored = st.read_checkpoint(src)
    assert {info.dtype for info in stored.values()} == {st.DTYPE_NAMES[dtype]}
    if layout == "model":
        assert all(name.startswith(("model.", "lm_head.")) for name in stored)
    target = tmp_path / "ckpt"
    __import__("shutil").copytree(src, target)
    assert main(["apply", str(target), str(data / "forget"), "--retain", str(data / "retain"), "--steps", "3",
                 "--views", "0"]) == 0
    report = json.loads((target / "unlearning_report.json").read_text())
    check_only_connector_changed(family, src, target, report)
    assert all(c["dtype"] == st.DTYPE_NAMES[dtype] for c in report["changed_tensors"])


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_on_cached_features_equals_the_models_forward(family, tiny, data):
    """answer_hidden (cached features, the connector as a function of the job's parameters) gives the
    hidden states of the model's own forward on the pixels."""
    loaded = open_checkpoint(tiny(family), torch.device("cpu"))
    pictures = sorted((data / "forget").rglob("*.png"))[:2]
    items = [Item(pictures[0], world.VISUAL_QUESTION, "Bruno Tanaka", "b"),
             Item(None, "Where does Bruno Tanaka live?", "Osaka", "b"),
             Item(pictures[1], "Describe this image.", "A face", "b")]
    assert all(isinstance(a, str) for a in greedy_answers(loaded, items[:2], 2))  # model.generate with the family's inputs
    samples = cache_samples(loaded, items, "check")
    batch = make_batches(loaded, samples, len(samples))[0]
    hidden = answer_hidden(loaded, master_params(loaded), batch)
    for i, (sample, item) in enumerate(zip(samples, items)):
        pixel = _pixels(loaded, item.image) if item.image is not None else None
        inputs = loaded.adapter.generate_inputs(loaded.model, sample.input_ids, pixel)
        if family == "paligemma":  # the processor's suffix: the answer attends causally, the prefix both ways
            inputs["token_type_ids"][0, sample.answer_start:] = 1
        with torch.no_grad():
            ref = loaded.model.model(**inputs, use_cache=False).last_hidden_state[0]
        expected = ref[sample.answer_start - 1 : len(sample.input_ids) - 1]
        torch.testing.assert_close(hidden[batch.answer_seq == i], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava_next", "qwen3_vl", "mllama", "idefics2"])
def test_batched_fisher_equals_the_per_sample_loop(family, tiny, data):
    """Per-sample gradients through per-picture parameter copies (mask.fisher_diagonal) equal one
    backward pass per sample, for each way a connector enters the model (placeholders, deepstack,
    cross-attention, resampler)."""
    loaded = open_checkpoint(tiny(family), torch.device("cpu"))
    pictures = sorted((data / "forget").rglob("*.png"))[:3]
    items = [Item(p, world.VISUAL_QUESTION, "Bruno Tanaka", "b") for p in pictures]
    items.insert(1, Item(None, "Where does Bruno Tanaka live?", "Osaka", "b"))
    samples = cache_samples(loaded, items, "fisher")
    params = master_params(loaded)
    expected = fisher_diagonal_loop(loaded, params, samples, limit=64)
    got = fisher_diagonal(loaded, params, samples, limit=64, chunk=3)  # a ragged chunk with a text-only sample
    assert any(float(e.abs().max()) > 0 for e in expected.values())
    for name in expected:
        scale = float(expected[name].abs().max()) or 1.0
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_views_in_one_tower_call_give_each_views_features(family, tiny, data):
    loaded = open_checkpoint(tiny(family), torch.device("cpu"))
    image = sorted((data / "forget").rglob("*.png"))[0]
    pixels = [_pixels(loaded, image, view, seed=0) for view in range(3)]
    together = loaded.adapter.vision_features_batch(loaded.model, pixels)
    assert len(together) == len(pixels)
    for got, pixel in zip(together, pixels):
        torch.testing.assert_close(got, loaded.adapter.vision_features(loaded.model, pixel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["paligemma", "gemma3", "vipllava", "qwen2_5_vl", "mllama", "idefics3"])
def test_loaded_as_stored_then_cast_equals_loaded_in_fp32(family, tiny):
    """bf16 shards loaded as stored, the LLM cast later, the input embedding table kept as stored:
    every tensor (and every embedding lookup) is what loading straight to fp32 gives."""
    from transformers import AutoModelForImageTextToText

    from fastunlearn.load import compute_dtype

    src = tiny(family, torch.bfloat16)
    expected = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    loaded = open_checkpoint(src, torch.device("cpu"), llm_later=True)
    lm_head = loaded.model.get_output_embeddings().weight
    # the LLM waits for compute_dtype; Gemma's embed_scale, computed when built, makes it load in fp32
    assert lm_head.dtype == (torch.float32 if "gemma" in family else torch.bfloat16)
    assert loaded.model.dtype == torch.float32  # what family code casts its inputs to
    compute_dtype(loaded, keep_embeddings=True)
    table = loaded.model.get_input_embeddings()
    assert loaded.model.dtype == torch.float32
    got = {**dict(loaded.model.named_parameters()), **dict(loaded.model.named_buffers())}
    for name, t in {**dict(expected.named_parameters()), **dict(expected.named_buffers())}.items():
        if got[name] is table.weight and type(table) is torch.nn.Embedding:
            assert t.dtype == torch.float32 and got[name].dtype == torch.bfloat16, name  # kept as stored
        else:
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    ids = torch.arange(min(50, table.num_embeddings))[None]
    out = table(ids)
    assert out.dtype == torch.float32 and torch.equal(out, expected.get_input_embeddings()(ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_rows_only_in_the_last_layer_give_the_same_nll_and_gradient(family, tiny, data, monkeypatch):
    from fastunlearn import forward

    loaded = open_checkpoint(tiny(family), torch.device("cpu"))
    items = read_folder(data / "forget")[:2] + [Item(None, "What is the job of Ada?", "baker", "")]
    batch = make_batches(loaded, cache_samples(loaded, items, "test"), 8)[0]
    seen = []  # rows the last layer's MLP computes (this hook runs before the one that scatters them)
    layer = forward.last_decoder_layer(loaded.model)
    layer.mlp.register_forward_hook(lambda m, args, out: seen.append((out[0] if isinstance(out, tuple) else out).shape[:-1].numel()))
    results = []
    for parts in (forward.PER_TOKEN_PARTS, ()):  # the answer rows only; then the whole layer
        monkeypatch.setattr(forward, "PER_TOKEN_PARTS", parts)
        params = {n: p.requires_grad_(True) for n, p in master_params(loaded).items()}
        nll = forward.sequence_nll(loaded, params, batch)
        results.append((nll.detach(), torch.autograd.grad(nll.sum(), list(params.values()), allow_unused=True)))
    assert seen == [len(batch.answer_rows), batch.input_ids.numel()]
    (nll, grads), (expected_nll, expected_grads) = results
    torch.testing.assert_close(nll, expected_nll, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6 * max(1.0, float(e.abs().max())))


@pytest.mark.parametrize("family", ["aya_vision", "vipllava"])
def test_answer_nll_is_the_models_own_loss(family, tiny, data):
    """The job's answer NLL (cached features, answer rows only) equals the cross-entropy of the model's
    own logits on the pixels, the family's logit scale included (Aya Vision's Cohere2: 0.5 here)."""
    from transformers import __version__ as transformers_version

    from fastunlearn.forward import score

    loaded = open_checkpoint(tiny(family), torch.device("cpu"))
    picture = sorted((data / "forget").rglob("*.png"))[0]
    item = Item(picture, world.VISUAL_QUESTION, "Bruno Tanaka", "b")
    sample = cache_samples(loaded, [item], "check")[0]
    got = score(loaded, master_params(loaded), make_batches(loaded, [sample], 1))["nll"][0]
    inputs = loaded.adapter.generate_inputs(loaded.model, sample.input_ids, _pixels(loaded, picture))
    with torch.no_grad():
        logits = loaded.model(**inputs, use_cache=False).logits[0]
    scale = loaded.adapter.logit_scale(loaded.model)
    if family == "aya_vision" and tuple(map(int, transformers_version.split(".")[:2])) < (5, 25):
        logits = logits * scale  # transformers 5.24's AyaVision forward dropped Cohere2's logit scale
    answer = sample.input_ids[sample.answer_start:]
    expected = torch.nn.functional.cross_entropy(logits[sample.answer_start - 1:-1].float(), answer, reduction="sum")
    assert scale == (0.5 if family == "aya_vision" else 1.0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
