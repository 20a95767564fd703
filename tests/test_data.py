import json
import os

import numpy as np
import pytest
from PIL import Image

from fastunlearn.data import DEFAULT_QUESTIONS, read_folder
from fastunlearn.errors import UserError


def picture(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def test_qa_lines_and_default_questions(tmp_path):
    picture(tmp_path / "alice" / "a.png")
    picture(tmp_path / "alice" / "deep" / "b.jpg")
    picture(tmp_path / "loose.webp")
    (tmp_path / "alice" / "qa.jsonl").write_text(
        json.dumps({"image": "a.png", "question": "Who?", "answer": "Alice"}) + "\n\n"
        + json.dumps({"image": "a.png", "question": "Name?", "answer": "A."}) + "\n"
    )
    items = read_folder(tmp_path)
    by_image = {}
    for it in items:
        by_image.setdefault(it.image.name, []).append(it)
    assert [(it.question, it.answer) for it in by_image["a.png"]] == [("Who?", "Alice"), ("Name?", "A.")]
    assert [(it.question, it.answer) for it in by_image["b.jpg"]] == [(q, None) for q in DEFAULT_QUESTIONS]
    assert by_image["b.jpg"][0].subject == "alice" and by_image["loose.webp"][0].subject == ""


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing")
    with pytest.raises(UserError, match="no images"):
        read_folder(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_folder(tmp_path / "nope")


def test_unreadable_image_is_named(tmp_path):
    picture(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match=r"broken\.png: unreadable image"):
        read_folder(tmp_path)


def test_truncated_image_is_named(tmp_path):
    data = picture(tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"t\.png: unreadable image"):
        read_folder(tmp_path)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"image": "a.png", "question": "Q"}', "'answer' must be a non-empty string"),
    ('{"image": "gone.png", "question": "Q", "answer": "A"}', "does not exist"),
    ('{"image": "../outside.png", "question": "Q", "answer": "A"}', "outside the folder"),
    ('{"image": "/etc/passwd", "question": "Q", "answer": "A"}', "outside the folder"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    root = tmp_path / "forget"
    picture(root / "a.png")
    picture(tmp_path / "outside.png")
    (root / "qa.jsonl").write_text(json.dumps({"image": "a.png", "question": "Q", "answer": "A"}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=rf"qa\.jsonl:2: .*{message}"):
        read_folder(root)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    root = tmp_path / "forget"
    picture(root / "a.png")
    secret = picture(tmp_path / "secret.png")
    os.symlink(secret, root / "link.png")
    with pytest.raises(UserError, match="outside the forget folder"):
        read_folder(root)
