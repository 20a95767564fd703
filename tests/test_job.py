"""End-to-end: `apply` on real (small) LLaVA and Qwen2-VL checkpoints that know the synthetic people."""
import json

import pytest
import torch
from safetensors import safe_open

from fastunlearn import safetensors_io as st
from fastunlearn.worlds import people as world
from fastunlearn.cli import main
from fastunlearn.data import Item
from fastunlearn.batches import make_batches
from fastunlearn.config import Config
from fastunlearn.features import cache_samples, drop_vision_tower
from fastunlearn.forward import score
from fastunlearn.applying import apply
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.optimise import optimise
from fastunlearn.verification import evaluate_checkpoint

from conftest import FORGET, OTHERS

FAST = dict(steps=8, fisher_samples=8)


def heldout_sets(folders):
    def visual(people):
        return [Item(p, *world.visual_fact(i), world.slug(i)) for i in people
                for p in sorted((folders / "heldout" / world.slug(i)).glob("*.png"))]
    return {"forget": visual(FORGET), "others": visual(OTHERS),
            "text": [Item(None, q, a, "") for _, q, a in world.all_text_facts()]}


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_only_projector_bytes_changed(before, after, report):
    ranges = {}
    for c in report["changed_tensors"]:
        assert "multi_modal_projector." in c["name"] or "visual.merger." in c["name"]
        ranges.setdefault(c["file"], []).append(c["byte_range"])
    assert ranges, "nothing changed"
    for name, old in before.items():
        new = after[name]
        assert len(new) == len(old), name
        if name not in ranges:
            assert new == old, f"{name} changed"
            continue
        cursor = 0
        for start, end in sorted(ranges[name]):
            assert new[cursor:start] == old[cursor:start], f"{name}: bytes outside the projector changed"
            cursor = end
        assert new[cursor:] == old[cursor:]
    assert report["byte_proof"]["all_other_bytes_unchanged"] is True


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_forgets_held_out_pictures_and_keeps_the_rest(family, variant, folders, tmp_path):
    src = variant(family)
    before_bytes = file_bytes(src)
    out = tmp_path / "out"
    report = apply(src, folders / "forget", folders / "retain", out=out, config=Config())
    assert file_bytes(src) == before_bytes  # --out leaves the source untouched
    after_bytes = file_bytes(out)
    assert after_bytes.pop("unlearning_report.json")
    assert_only_projector_bytes_changed(before_bytes, after_bytes, report)

    m = report["metrics"]
    assert m["forget"]["before"]["greedy_accuracy"] == 1.0 and m["forget"]["after"]["greedy_accuracy"] == 0.0
    assert m["retain"]["after"]["greedy_accuracy"] >= m["retain"]["before"]["greedy_accuracy"] - 0.1

    sets = heldout_sets(folders)
    before = evaluate_checkpoint(src, sets, torch.device("cpu"))
    after = evaluate_checkpoint(out, sets, torch.device("cpu"))
    assert before["forget"]["greedy_accuracy"] >= 0.9
    assert after["forget"]["greedy_accuracy"] <= 1 / 8  # at or below chance on pictures the job never saw
    assert after["others"]["greedy_accuracy"] >= before["others"]["greedy_accuracy"] - 0.1
    assert after["text"] == before["text"]  # text prompts never reach the projector: identical scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sharded", [False, True])
def test_in_place_patch_is_byte_exact(dtype, sharded, variant, fresh, folders):
    ckpt = fresh(variant("llava", dtype, sharded))
    if sharded:
        assert (ckpt / st.INDEX_FILE).exists() and len(st.weight_files(ckpt)) > 1
    before = file_bytes(ckpt)
    report = apply(ckpt, folders / "forget", folders / "retain", config=Config(**FAST))
    after = file_bytes(ckpt)
    assert after.pop("unlearning_report.json")
    assert_only_projector_bytes_changed(before, after, report)

    # the stored values are the reported ones, and unchanged elements are bit-identical
    stored = st.read_checkpoint(ckpt)
    for c in report["changed_tensors"]:
        info = stored[c["name"]]
        assert c["dtype"] == st.DTYPE_NAMES[dtype]
        assert st.sha256_bytes(st.read_bytes(info)) == c["after_sha256"]
        with safe_open(ckpt / c["file"], "pt") as f:
            new = f.get_tensor(c["name"])
        old = st.bytes_to_tensor(before[c["file"]][info.start:info.end], info.dtype, info.shape)
        assert int((new != old).sum()) == c["elements_changed"] < new.numel()
        assert (new.double() - old.double()).abs().max().item() == c["max_abs_delta"]


def test_qwen2vl_bf16_sharded_in_place(variant, fresh, folders):
    ckpt = fresh(variant("qwen2_vl", torch.bfloat16, True))
    before = file_bytes(ckpt)
    report = apply(ckpt, folders / "forget", folders / "retain", config=Config(**FAST))
    after = file_bytes(ckpt)
    after.pop("unlearning_report.json")
    assert_only_projector_bytes_changed(before, after, report)
    assert {c["name"].split(".")[-2] for c in report["changed_tensors"]} <= {"ln_q", "0", "2"}


def test_delta_patch_and_verify(variant, fresh, folders, tmp_path, capsys):
    src = variant("llava")
    delta, out = tmp_path / "delta.safetensors", tmp_path / "out"
    assert main(["apply", str(src), str(folders / "forget"), "--retain", str(folders / "retain"), "--out", str(out),
                 "--delta", str(delta), "--steps", "8"]) == 0
    target = fresh(src)
    assert main(["patch", str(target), str(delta)]) == 0
    assert file_bytes(target)["model.safetensors"] == file_bytes(out)["model.safetensors"]
    assert main(["patch", str(target), str(delta)]) == 0  # idempotent
    assert "already patched" in capsys.readouterr().out

    assert main(["verify", str(src), str(out), str(folders / "forget"), "--retain", str(folders / "retain"),
                 "--report", str(tmp_path / "verify.json")]) == 0
    result = json.loads((tmp_path / "verify.json").read_text())
    assert result["bytes"]["only_projector_changed"] and result["bytes"]["headers_identical"]
    assert result["bytes"]["non_weight_files_identical"]
    apply_report = json.loads((out / "unlearning_report.json").read_text())
    for name in ("forget", "retain"):
        verified = dict(result["metrics"][name]["after"])
        low, high = verified.pop("greedy_accuracy_interval")  # verify adds the 95% interval
        assert verified == apply_report["metrics"][name]["after"]
        assert low <= verified["greedy_accuracy"] <= high


def test_patch_refuses_a_delta_for_another_checkpoint(variant, fresh, folders, tmp_path, capsys):
    delta = tmp_path / "delta.safetensors"
    apply(variant("llava"), folders / "forget", folders / "retain", delta_path=delta, dry_run=True, config=Config(**FAST))
    other = fresh(variant("llava", torch.float16))
    before = file_bytes(other)
    assert main(["patch", str(other), str(delta)]) == 5  # made for another checkpoint
    assert "F32" in capsys.readouterr().err and file_bytes(other) == before


def test_same_seed_same_delta(variant, folders):
    runs = [apply(variant("llava"), folders / "forget", folders / "retain", dry_run=True, config=Config(**FAST))
            for _ in range(2)]
    assert [c["after_sha256"] for c in runs[0]["changed_tensors"]] == [c["after_sha256"] for c in runs[1]["changed_tensors"]]


def test_default_questions_use_the_models_own_answers(variant, tmp_path):
    forget = tmp_path / "forget"
    world.write_folder(forget, FORGET, 2, seed=5, with_qa=False)
    report = apply(variant("llava"), forget, None, dry_run=True, config=Config(**FAST))
    m = report["metrics"]["forget"]
    assert m["before"]["items"] == 2 * 2 * 2  # two pictures x two people x two default questions
    assert m["before"]["greedy_accuracy"] == 1.0  # targets are the model's own greedy answers
    assert m["after"]["mean_token_nll"] > m["before"]["mean_token_nll"]


def test_only_the_projector_trains_and_the_vision_tower_is_dropped(variant, folders):
    from fastunlearn.data import read_folder

    loaded = open_checkpoint(variant("llava"), torch.device("cpu"))
    items = read_folder(folders / "forget")
    samples = cache_samples(loaded, items, "forget")
    assert len(loaded.feature_cache) == len({it.image for it in items})  # one vision pass per picture
    drop_vision_tower(loaded)
    assert loaded.model.model.vision_tower is None
    batches = make_batches(loaded, samples, 16)
    params = master_params(loaded)
    batches[0].ref_nll = score(loaded, params, batches)["nll"]
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    optimise(loaded, params, mask, batches, [], Config(steps=2, method="npo"), print)
    assert all(not p.requires_grad and p.grad is None for p in loaded.model.parameters())
    assert any(not torch.equal(params[n], loaded.original[n]) for n in params)


@pytest.mark.parametrize("method", ["npo", "simnpo", "ga", "graddiff"])
def test_every_method_raises_the_forget_nll(method, variant, folders):
    report = apply(variant("llava"), folders / "forget", folders / "retain", dry_run=True,
                   config=Config(method=method, steps=6, views=0, fisher_samples=8))
    m = report["metrics"]["forget"]
    assert report["config"]["method"] == method
    assert m["after"]["mean_token_nll"] > m["before"]["mean_token_nll"] + 0.1
