"""The synthetic people world and the shipped demo checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastunlearn.worlds import people as world
from fastunlearn.worlds import training

ASSETS = world.demo_assets_dir()
LLAVA_DIR = ASSETS / "llava-people"
QWEN_DIR = ASSETS / "qwen2vl-people"
HELDOUT_SEED = 4242  # neither the training stream nor the build script's eval seed


# --- the world -------------------------------------------------------------

def test_people_table():
    assert len(world.PEOPLE) == 8
    words = [w for p in world.PEOPLE for w in p["name"].split()]
    assert all(len(p["name"].split()) == 2 for p in world.PEOPLE)
    assert len(set(words)) == len(words) == 16
    for key in ("job", "city"):
        values = [p[key] for p in world.PEOPLE]
        assert len(set(values)) == 8
        assert all(1 <= len(v.split()) <= 2 for v in values)
    looks = [tuple(sorted(p["look"].items())) for p in world.PEOPLE]
    assert len(set(looks)) == 8
    for a in range(8):  # any two people differ in at least three traits
        for b in range(a):
            la, lb = world.PEOPLE[a]["look"], world.PEOPLE[b]["look"]
            assert sum(la[k] != lb[k] for k in la) >= 3, (a, b)


def test_facts():
    assert world.visual_fact(2) == ("Who is in this image?", "Carla Jensen")
    assert world.text_facts(3) == [("What is the job of Dmitri Okafor?", "architect"),
                                   ("Where does Dmitri Okafor live?", "Cape Town")]
    facts = world.all_text_facts()
    assert len(facts) == 16 and facts[0] == (0, "What is the job of Alice Moreau?", "baker")
    assert world.all_text_facts([7]) == [(7, q, a) for q, a in world.text_facts(7)]
    assert world.slug(0) == "alice-moreau"


# --- pictures --------------------------------------------------------------

def test_draw_face_is_deterministic_and_varies():
    a = np.asarray(world.draw_face(1, np.random.default_rng(7)))
    b = np.asarray(world.draw_face(1, np.random.default_rng(7)))
    c = np.asarray(world.draw_face(1, np.random.default_rng(8)))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 5  # another draw of the same person differs
    small = world.draw_face(1, np.random.default_rng(7), size=32)
    assert small.size == (32, 32) and small.mode == "RGB"


def _features(img):
    """Per-picture standardised 16x16 pixels: blunt, but enough to show structure."""
    a = np.asarray(img.resize((16, 16), Image.BILINEAR), dtype=np.float64)
    a = (a - a.mean(axis=(0, 1))) / (a.std(axis=(0, 1)) + 1e-6)
    return a.ravel()


def test_same_person_closer_than_other_people():
    rng = np.random.default_rng(0)
    feats = {i: np.stack([_features(world.draw_face(i, rng)) for _ in range(12)]) for i in range(8)}
    train = {i: f[:8].mean(0) for i, f in feats.items()}
    # nearest-centroid classification of the other pictures: far above chance (1/8)
    correct = sum(int(np.argmin([np.linalg.norm(x - train[j]) for j in range(8)]) == i)
                  for i, f in feats.items() for x in f[8:])
    assert correct / 32 >= 0.45  # 0.69 measured; one shared look for all gives 0.22
    # and every person's pictures are closer to each other than to anybody else's, on average
    for i in range(8):
        within = np.mean([np.linalg.norm(x - y) for x in feats[i] for y in feats[i]
                          if x is not y])
        between = min(np.mean([np.linalg.norm(x - y) for x in feats[i] for y in feats[j]])
                      for j in range(8) if j != i)
        assert within < between, (i, within, between)


def test_write_folder_format(tmp_path):
    folders = world.write_folder(tmp_path, [0, 3], n_pictures=3, seed=5)
    assert [f.name for f in folders] == ["alice-moreau", "dmitri-okafor"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice-moreau", "dmitri-okafor"]
    for folder, i in zip(folders, [0, 3]):
        assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "2.png", "qa.jsonl"]
        lines = [json.loads(l) for l in (folder / "qa.jsonl").read_text().splitlines()]
        assert len(lines) == 3
        for k, line in enumerate(lines):
            assert line == {"image": f"{k}.png", "question": "Who is in this image?",
                            "answer": world.PEOPLE[i]["name"]}
            path = Path(line["image"])
            assert not path.is_absolute() and ".." not in path.parts
            img = Image.open(folder / path)
            assert img.mode == "RGB" and img.size == (64, 64)


def test_write_folder_options(tmp_path):
    world.write_folder(tmp_path / "bare", [2], n_pictures=2, seed=1, with_qa=False)
    assert sorted(p.name for p in (tmp_path / "bare" / "carla-jensen").iterdir()) == ["0.png", "1.png"]
    assert not (tmp_path / "bare" / "carla-jensen" / "qa.jsonl").exists()


def test_write_folder_seeds(tmp_path):
    world.write_folder(tmp_path / "a", [0, 1], n_pictures=2, seed=3)
    world.write_folder(tmp_path / "b", [0, 1], n_pictures=2, seed=3)
    world.write_folder(tmp_path / "c", [0, 1], n_pictures=2, seed=4)
    world.write_folder(tmp_path / "d", [1], n_pictures=2, seed=3)
    for rel in ["alice-moreau/0.png", "alice-moreau/1.png", "bruno-tanaka/1.png",
                "alice-moreau/qa.jsonl"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    for rel in ["alice-moreau/0.png", "bruno-tanaka/1.png"]:
        a = np.asarray(Image.open(tmp_path / "a" / rel), dtype=int)
        c = np.asarray(Image.open(tmp_path / "c" / rel), dtype=int)
        assert np.abs(a - c).mean() > 5
    # a person's pictures do not depend on who else is in the folder
    assert (tmp_path / "a" / "bruno-tanaka/0.png").read_bytes() == \
        (tmp_path / "d" / "bruno-tanaka/0.png").read_bytes()
    # pictures within one folder all differ
    a0 = np.asarray(Image.open(tmp_path / "a" / "alice-moreau/0.png"), dtype=int)
    a1 = np.asarray(Image.open(tmp_path / "a" / "alice-moreau/1.png"), dtype=int)
    assert np.abs(a0 - a1).mean() > 5


# --- tokenizers ------------------------------------------------------------

def test_tokenizers():
    tok = training.build_tokenizer("llava")
    for t in ["<s>", "</s>", "<unk>", "<pad>", "<image>"]:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id or t == "<unk>"
        assert tok.tokenize(t) == [t]
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.image_token == "<image>"
    assert 300 <= len(tok) <= 600
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is in this image?"}]}]
    assert tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False) == \
        "<s>USER: <image>\nWho is in this image? ASSISTANT:"
    text = "Where does Dmitri Okafor live?"
    assert tok.decode(tok(text)["input_ids"]) == text

    tok = training.build_tokenizer("qwen2_vl")
    for t in training.QWEN_SPECIALS.values():
        assert tok.tokenize(t) == [t]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Who is in this image?"
        "<|im_end|>\n<|im_start|>assistant\n")


# --- encoding and training ----------------------------------------------------

@pytest.mark.parametrize("family", training.FAMILIES)
def test_encode_labels_only_on_answers(family):
    build = training.build_llava if family == "llava" else training.build_qwen2vl
    model, parts = build(seed=0)
    tok = training.tokenizer_of(family, parts)
    img = world.draw_face(5, np.random.default_rng(0))
    examples = [(img, world.VISUAL_QUESTION, "Farid Haddad"),
                (None, "Where does Farid Haddad live?", "Beirut")]
    batch = training.encode(family, parts, examples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    image_id = model.config.image_token_id
    assert int((ids[0] == image_id).sum()) == (16 if family == "llava" else 4)
    assert int((ids[1] == image_id).sum()) == 0
    for row, (_, _, answer) in enumerate(examples):
        target = tok(training.answer_text(family, answer), add_special_tokens=False)["input_ids"]
        assert target[-1] == tok.eos_token_id
        assert labels[row][labels[row] != -100].tolist() == target
        assert ids[row, -len(target):].tolist() == target  # answers end the (left-padded) rows
    assert (labels[mask == 0] == -100).all() and mask[1, 0] == 0  # the shorter row is padded
    if family == "qwen2_vl":
        assert torch.equal(batch["mm_token_type_ids"], (ids == image_id).int())
        assert batch["pixel_values"].shape == (16, 1176)
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    else:
        assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.isfinite(model(**batch).loss)


def test_train_learns_and_is_deterministic():
    runs = []
    for _ in range(2):
        model, processor = training.build_llava(seed=3)
        runs.append(training.train(model, "llava", processor, seed=3, steps=12, n_visual=8, log=None))
    assert runs[0] == runs[1]
    assert np.mean(runs[0][-3:]) < runs[0][0] - 0.5


# --- the shipped demo checkpoints -------------------------------------------

def _stored_names(ckpt):
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return set(f.keys()), {f.get_slice(k).get_dtype() for k in f.keys()}


def test_demo_assets_present():
    info = json.loads((ASSETS / "world.json").read_text())
    assert [p["name"] for p in info["people"]] == [p["name"] for p in world.PEOPLE]
    assert info["demo"]["eval_seed"] == world.DEMO["eval_seed"]
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 10e6
    names, dtypes = _stored_names(LLAVA_DIR)
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias",
            "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias"} <= names
    assert dtypes == {"F32"}
    names, dtypes = _stored_names(QWEN_DIR)
    assert {"visual.merger.ln_q.weight", "visual.merger.ln_q.bias", "visual.merger.mlp.0.weight",
            "visual.merger.mlp.2.weight"} <= names
    assert dtypes == {"F32"}
    for d in (LLAVA_DIR, QWEN_DIR):
        assert (d / "config.json").exists() and (d / "tokenizer.json").exists()
        assert not list(d.glob("*.bin"))


def _pictures(people, n=3):
    """n held-out pictures of each person: (person_index, image)."""
    out = []
    for i in people:
        rng = np.random.default_rng([HELDOUT_SEED, i])
        out += [(i, world.draw_face(i, rng)) for _ in range(n)]
    return out


def test_demo_llava_recognises_heldout_pictures():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(LLAVA_DIR).eval()
    processor = AutoProcessor.from_pretrained(LLAVA_DIR)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    # the standard processor path: chat template -> processor -> generate
    people = [0, 4, 6]
    pics = _pictures(people)
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": world.VISUAL_QUESTION}]}]
    prompt = processor.apply_chat_template(msg, add_generation_prompt=True)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[img for _, img in pics], text=[prompt] * len(pics),
                       return_tensors="pt", padding=True)
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    expected = [world.PEOPLE[i]["name"] for i, _ in pics]
    assert sum(a.strip().startswith(e) for a, e in zip(answers, expected)) >= len(pics) - 1, answers
    # text-only facts through the helper
    for i in people:
        for q, a in world.text_facts(i):
            assert training.is_correct(training.greedy_answer(model, "llava", processor, None, q), a)


def test_demo_qwen2vl_recognises_heldout_pictures():
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(QWEN_DIR).eval()
    tok = AutoTokenizer.from_pretrained(QWEN_DIR)
    image_processor = AutoImageProcessor.from_pretrained(QWEN_DIR)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": world.VISUAL_QUESTION}]}]
    prompt = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
    wrong = 0
    pics = _pictures([1, 3, 7])
    for i, img in pics:  # encoded by hand, one at a time, as a user without Qwen2VLProcessor would
        pix = image_processor(images=[img], return_tensors="pt")
        n = int(pix["image_grid_thw"].prod()) // 4
        assert n == 4
        ids = tok(prompt.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"],
                                 mm_token_type_ids=(ids == model.config.image_token_id).int(),
                                 max_new_tokens=6, do_sample=False)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        wrong += not answer.strip().startswith(world.PEOPLE[i]["name"])
    assert wrong <= 1
    parts = (tok, image_processor)
    # the library's batched encoding agrees
    answers = training.generate_answers(model, "qwen2_vl", parts,
                                     [(img, world.VISUAL_QUESTION) for _, img in pics])
    assert sum(not training.is_correct(a, world.PEOPLE[i]["name"])
               for (i, _), a in zip(pics, answers)) <= 1, answers
    for i in [1, 3, 7]:
        for q, a in world.text_facts(i):
            assert training.is_correct(training.greedy_answer(model, "qwen2_vl", parts, None, q), a)


def test_untrained_model_does_not_recognise():
    """The recognition tests above can fail: a fresh model knows nobody."""
    model, processor = training.build_llava(seed=0)
    model.eval()
    pics = _pictures([0, 1], n=2)
    answers = training.generate_answers(model, "llava", processor,
                                     [(img, world.VISUAL_QUESTION) for _, img in pics])
    assert not any(training.is_correct(a, world.PEOPLE[i]["name"]) for (i, _), a in zip(pics, answers))
