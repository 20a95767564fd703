"""Hostile or broken input: forget/retain folders that try to make the job read outside them or
choke on pictures and jsonl, config.json files that lie, checkpoints carrying pickles and code.

Every case must end in a one-line UserError (or, where the docs say so, be skipped) and nothing
outside the given folder may be opened: an audit hook records every open() of the process.
"""
import json
import os
import pickle
import struct
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from fastunlearn.cli import main
from fastunlearn.data import read_folder
from fastunlearn.errors import UserError

from conftest import tree

OPENED = []  # paths opened while recording (None: not recording)
_recording = [False]


def _audit(event, args):
    if event == "open" and _recording[0] and args and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))
    if event == "pickle.find_class" and _recording[0]:
        OPENED.append(f"pickle:{args}")
    if event == "import" and _recording[0] and "evil" in str(args[0]):
        OPENED.append(f"import:{args[0]}")


sys.addaudithook(_audit)


def recording(fn, *args, **kw):
    OPENED.clear()
    _recording[0] = True
    try:
        return fn(*args, **kw)
    finally:
        _recording[0] = False


def picture(path, size=16, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def png_claiming(path, width, height):
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def qa(root, image, name="qa.jsonl"):
    line = json.dumps({"image": image, "question": "Who?", "answer": "X"})
    (root / name).write_text(json.dumps({"image": "a.png", "question": "Who?", "answer": "X"}) + "\n" + line + "\n")


def _escape_dotdot(root, out):
    qa(root, "../outside/secret.png")


def _escape_nested_dotdot(root, out):
    qa(root, "sub/../../outside/secret.png")


def _escape_absolute(root, out):
    qa(root, str(out / "secret.png"))


def _nul_in_path(root, out):
    qa(root, "a.png\x00.png")


def _symlinked_picture(root, out):
    os.symlink(out / "secret.png", root / "link.png")


def _symlinked_folder(root, out):
    os.symlink(out, root / "linked-dir", target_is_directory=True)


def _symlinked_jsonl(root, out):
    (out / "qa.jsonl").write_text(json.dumps({"image": "a.png", "question": "Q", "answer": "A"}) + "\n")
    os.symlink(out / "qa.jsonl", root / "qa.jsonl")


def _jsonl_via_inner_symlink(root, out):
    os.symlink(out, root / "door")
    qa(root, "door/secret.png")


def _not_an_image(root, out):
    (root / "b.png").write_text("just text, not a picture")


def _gif_as_png(root, out):
    Image.new("RGB", (8, 8)).save(root / "b.png", format="GIF")


def _eps_as_jpg(root, out):
    (root / "b.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(pwned) print\n")


def _truncated(root, out):
    data = picture(root / "b.png", size=64).read_bytes()
    (root / "b.png").write_bytes(data[: len(data) // 2])


def _bomb_over_pil_limit(root, out):
    png_claiming(root / "b.png", 30000, 30000)


def _bomb_over_our_limit(root, out):
    png_claiming(root / "b.png", 8000, 8000)


def _huge_line(root, out):
    with open(root / "qa.jsonl", "wb") as f:
        f.write(b'{"image": "a.png", "question": "' + b"x" * (16 << 20))


def _not_utf8(root, out):
    (root / "qa.jsonl").write_bytes(b'{"image": "a.png", "question": "\xff\xfe", "answer": "A"}\n')


def _deep_json(root, out):
    (root / "qa.jsonl").write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")


def _text_file_as_image(root, out):
    (root / "notes.txt").write_text("hello")
    qa(root, "notes.txt")


def _fifo_picture(root, out):
    os.mkfifo(root / "pipe.png")  # reading it would hang: not a regular file, skipped


HOSTILE = [
    (_escape_dotdot, "outside the folder"), (_escape_nested_dotdot, "outside the folder"),
    (_escape_absolute, "outside the folder"), (_nul_in_path, "NUL"),
    (_symlinked_picture, "links outside the forget folder"), (_symlinked_folder, "links outside the forget folder"),
    (_symlinked_jsonl, "links outside the forget folder"), (_jsonl_via_inner_symlink, "links outside the forget folder"),
    (_not_an_image, "unreadable image"), (_gif_as_png, "not a PNG, JPEG, WEBP, BMP picture"),
    (_eps_as_jpg, "not a PNG, JPEG, WEBP, BMP picture"), (_truncated, "unreadable image"),
    (_bomb_over_pil_limit, "unreadable image"), (_bomb_over_our_limit, "image too large"),
    (_huge_line, "line longer than"), (_not_utf8, "not UTF-8"), (_deep_json, "not usable JSON"),
    (_text_file_as_image, "is not a picture"), (_fifo_picture, None),
]


@pytest.mark.parametrize("make, message", HOSTILE, ids=[f.__name__[1:] for f, _ in HOSTILE])
def test_hostile_folder(tmp_path, make, message):
    root, out = tmp_path / "forget", tmp_path / "outside"
    picture(root / "a.png")
    picture(out / "secret.png", seed=1)
    make(root, out)
    tracemalloc.start()
    try:
        if message is None:
            items = recording(read_folder, root)
            assert {it.image.name for it in items} == {"a.png"}  # skipped, never opened
        else:
            with pytest.raises(UserError, match=message) as e:
                recording(read_folder, root)
            assert "\n" not in str(e.value)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated"  # the 16 MB line is never held whole
    leaked = [p for p in OPENED if str(out) in os.path.realpath(p) or p.startswith("/etc") or "pipe" in p]
    assert leaked == [], f"opened outside the folder: {leaked}"


# ---------------------------------------------------------------- config.json that lies


def _lie(ckpt, change):
    config = json.loads((ckpt / "config.json").read_text())
    change(config)
    (ckpt / "config.json").write_text(json.dumps(config))


LIES = [
    ("text hidden size", lambda c: c["text_config"].update(hidden_size=c["text_config"]["hidden_size"] * 2), "does not match the weights"),
    ("vision hidden size", lambda c: c["vision_config"].update(hidden_size=c["vision_config"]["hidden_size"] + 8), "does not match the weights"),
    ("fewer layers", lambda c: c["text_config"].update(num_hidden_layers=1), "does not match the weights"),
    ("no text_config (defaults: a 7B LLM)", lambda c: c.pop("text_config"), "does not match the weights"),
    ("no vision_config", lambda c: c.pop("vision_config"), "does not match the weights"),
    ("unknown model_type", lambda c: c.update(model_type="llava_next_but_not"), "model_type"),
    ("no model_type", lambda c: c.pop("model_type"), "no model_type"),
    ("projector activation", lambda c: c.update(projector_hidden_act="relu"), "not supported"),
    ("remote code", lambda c: c.update(auto_map={"AutoModelForImageTextToText": "evil.Model"}), None),
]


@pytest.mark.parametrize("what, change, message", LIES, ids=[w for w, _, _ in LIES])
def test_config_that_lies_fails_before_work(ckpt, forget, capsys, monkeypatch, what, change, message):
    import fastunlearn.job as job

    _lie(ckpt, change)
    (ckpt / "evil.py").write_text(f"open({str(ckpt / 'PWNED')!r}, 'w').write('x')\n")
    before = tree(ckpt)
    if message is None:  # auto_map is ignored without trust_remote_code: the job runs, evil.py does not
        rc = recording(main, ["apply", str(ckpt), str(forget), "--steps", "2", "--views", "0", "--device", "cpu"])
        assert rc == 0, capsys.readouterr().err
    else:
        monkeypatch.setattr(job, "unlearn", lambda *a, **k: pytest.fail("work started on a lying config.json"))
        rc = main(["apply", str(ckpt), str(forget)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and message in err, err
        assert tree(ckpt) == before
    assert not (ckpt / "PWNED").exists()


# ---------------------------------------------------------------- only safetensors, nothing executed


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_and_code_in_the_checkpoint_are_never_loaded(ckpt, forget, tmp_path, capsys, monkeypatch):
    """Pickles beside the safetensors and processor code named by auto_map: the job completes
    (--out copies and hashes those files as bytes) without unpickling or importing anything:
    no pickle.find_class or import audit event, torch.load never called, the payload never ran."""
    import torch

    marker = tmp_path / "PWNED"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth", "scheduler.pkl"):
        (ckpt / name).write_bytes(pickle.dumps(Payload(marker)))
    (ckpt / "processing_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    for cfg in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        if (ckpt / cfg).exists():
            data = json.loads((ckpt / cfg).read_text())
            data["auto_map"] = {"AutoProcessor": "processing_evil.Evil", "AutoTokenizer": ["processing_evil.Evil", None]}
            (ckpt / cfg).write_text(json.dumps(data))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    rc = recording(main, ["apply", str(ckpt), str(forget), "--steps", "2", "--views", "0", "--device", "cpu",
                          "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    assert not marker.exists()
    assert [p for p in OPENED if p.startswith(("pickle:", "import:"))] == []
