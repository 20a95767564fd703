"""The auditor's view: apply's and verify's JSON reports, `fastunlearn report --html`, no forgotten content."""
import base64
import json
import re
import shutil

import pytest

from fastunlearn import safetensors_io as st
from fastunlearn.worlds import people as world
from fastunlearn.cli import main
from fastunlearn.report import delta_sha256
from fastunlearn.verification import compare_checkpoints

from conftest import FORGET, asset

FAST = ["--steps", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def reports(folders, tmp_path_factory):
    """apply --out on the demo LLaVA, then verify (with text questions), report --html of both."""
    root = tmp_path_factory.mktemp("reports")
    out = root / "unlearned"
    assert main(["apply", str(asset("llava")), str(folders / "forget"), "--retain", str(folders / "retain"),
                 "--out", str(out), *FAST]) == 0
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"question": q, "answer": a, "subject": world.slug(i)}) + "\n"
                            for i, q, a in world.all_text_facts()))
    assert main(["verify", str(asset("llava")), str(out), str(folders / "forget"), "--retain", str(folders / "retain"),
                 "--text", str(text), "--report", str(root / "verify.json"), "--device", "cpu"]) == 0
    assert main(["report", str(root / "verify.json"), "--html", str(root / "verify.html")]) == 0
    assert main(["report", str(out / "unlearning_report.json"), "--html", str(root / "apply.html")]) == 0
    return {"root": root, "out": out, "apply": (out / "unlearning_report.json").read_text(),
            "verify": (root / "verify.json").read_text(), "verify_html": (root / "verify.html").read_text(),
            "apply_html": (root / "apply.html").read_text()}


def forgotten_content(folders):
    """Every string that would reveal what was forgotten: names, folder names, questions, answers, facts,
    and the pictures' bytes as base64 and hex."""
    strings = {world.VISUAL_QUESTION}
    for i in FORGET:
        strings |= {world.PEOPLE[i]["name"], world.slug(i), *world.PEOPLE[i]["name"].split()}
        for q, a in world.text_facts(i):
            strings |= {q, a}
    for picture in (folders / "forget").rglob("*.png"):
        data = picture.read_bytes()[100:160]  # past the PNG header, which all pictures share
        strings |= {base64.b64encode(data).decode()[:40], data.hex()[:40]}
    return strings


def test_reports_hold_no_forgotten_content(reports, folders):
    texts = {k: reports[k] for k in ("apply", "verify", "verify_html", "apply_html")}
    for what in forgotten_content(folders):
        for name, text in texts.items():
            assert what.lower() not in text.lower(), f"{what!r} in the {name} report"
    # the content is there as hashes: an auditor holding the data can check it
    verify = json.loads(reports["verify"])
    assert len(verify["data"]["forget"]["items_sha256"]) == verify["evaluation"]["before"]["forget"]["items"]


def test_html_page_is_self_contained(reports):
    for page in (reports["verify_html"], reports["apply_html"]):
        assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "Before and after" in page
        assert not re.search(r"https?:|//[a-z]|<script|<link|<img|<iframe|@import|url\(", page, re.I)
    assert "Every other byte of every file unchanged (sha256): yes" in reports["verify_html"]


def test_verify_report_proves_bytes_and_metrics(reports):
    v = json.loads(reports["verify"])
    b = v["bytes"]
    assert b["all_other_bytes_unchanged"] and b["changed_tensors"]
    assert all(c["projector"] and c["sha256_original"] != c["sha256_unlearned"] for c in b["changed_tensors"])
    assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256_original"]) for f in b["files"] if f["sha256_original"])
    e = v["evaluation"]
    assert e["text_answer_nll_max_change"] == 0.0  # text prompts never reach the projector
    assert e["before"]["text"]["answer_nll"] == e["after"]["text"]["answer_nll"]
    assert e["before"]["forget"]["exact_accuracy"] == 1.0 > e["after"]["forget"]["exact_accuracy"]
    for key in ("mc_accuracy", "generation_contains_answer"):
        assert key in e["after"]["forget"] and key in e["after"]["retain"]
    assert "relearn" in e["after"] and "probe" in e["after"]
    apply_report = json.loads(reports["apply"])
    assert v["job"]["config"] == apply_report["config"] and v["job"]["reproduce"] == apply_report["reproduce"]


def test_verify_report_and_page_carry_intervals(reports):
    v = json.loads(reports["verify"])
    for when in ("before", "after"):
        for name in ("forget", "retain", "text"):
            m = v["evaluation"][when][name]
            low, high = m["intervals"]["exact_accuracy"]
            assert low <= m["exact_accuracy"] <= high and high - low > 0  # a few questions: never a point
    assert v["requests"][0]["relearn"]["after"] == v["evaluation"]["after"]["relearn"]
    m = v["evaluation"]["after"]["forget"]
    low, high = m["intervals"]["exact_accuracy"]
    shown = f"{100 * m['exact_accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
    assert shown in reports["verify_html"] and "95% interval" in reports["verify_html"]


def test_apply_report_records_how_to_reproduce(reports):
    r = json.loads(reports["apply"])
    rep = r["reproduce"]
    assert rep["deterministic_on_cpu"] and rep["seed"] == r["config"]["seed"] == 0
    assert rep["delta_sha256"] == delta_sha256(r["changed_tensors"])
    assert "--seed 0" in rep["command"] and "--steps 8" in rep["command"]


def test_a_changed_byte_outside_the_projector_is_caught(reports, tmp_path):
    tampered = shutil.copytree(reports["out"], tmp_path / "tampered")
    info = st.read_checkpoint(tampered)["language_model.lm_head.weight"]
    with open(info.file, "r+b") as f:
        f.seek(8 + st.read_header(info.file).length + info.start)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    result = compare_checkpoints(asset("llava"), tampered)
    assert not result["all_other_bytes_unchanged"] and not result["only_projector_changed"]


def test_report_command_rejects_what_is_not_a_report(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a fastunlearn report" in err and err.count("\n") == 1


def test_probe_split_keeps_every_picture_in_one_half(tmp_path):
    from fastunlearn.data import Item
    from fastunlearn.verification import split_pictures

    items = [Item(tmp_path / f"{s}{k}.png", q, "a", s) for s in ("x", "y") for k in range(4) for q in ("Q1", "Q2")]
    train, test = split_pictures(items)
    assert {it.image for it in train}.isdisjoint({it.image for it in test})
    assert len(train) == len(test) == 8 and {it.subject for it in train} == {it.subject for it in test} == {"x", "y"}
