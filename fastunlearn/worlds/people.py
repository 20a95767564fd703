"""The synthetic "people" world behind fastunlearn's demo and tests.

Eight made-up people, each with a name, a job, a city and a face: an
identity-specific cartoon (skin, hair colour, hair style, eyes, mouth,
accessory) drawn under random shift, scale, tilt, background, lighting and
pixel noise, so that no two pictures are alike yet each stays recognisable.

The tiny checkpoints that know this world are built and trained in
`training.py`.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------

# look: skin colour, hair colour, hair style, eyes, mouth, accessory.
# Any two people differ in at least three of these six traits.
# Colours differ in hue, not only in brightness, so that lighting cannot turn
# one into another.
SKIN = [(250, 214, 190), (214, 160, 90), (141, 85, 36), (205, 120, 125)]
HAIR = [(25, 25, 30), (235, 200, 80), (190, 60, 30), (205, 205, 212)]

PEOPLE = [
    dict(name="Alice Moreau", job="baker", city="Lyon",
         look=dict(skin=0, hair=0, style="flat", eyes="dots", mouth="smile", extra="none")),
    dict(name="Bruno Tanaka", job="taxi driver", city="Osaka",
         look=dict(skin=1, hair=1, style="side", eyes="squares", mouth="line", extra="glasses")),
    dict(name="Carla Jensen", job="nurse", city="Oslo",
         look=dict(skin=2, hair=2, style="spiky", eyes="dots", mouth="open", extra="none")),
    dict(name="Dmitri Okafor", job="architect", city="Cape Town",
         look=dict(skin=3, hair=3, style="bun", eyes="squares", mouth="smile", extra="beard")),
    dict(name="Emil Ruiz", job="teacher", city="Madrid",
         look=dict(skin=0, hair=2, style="side", eyes="lines", mouth="line", extra="beard")),
    dict(name="Farid Haddad", job="chef", city="Beirut",
         look=dict(skin=1, hair=3, style="flat", eyes="dots", mouth="open", extra="glasses")),
    dict(name="Greta Novak", job="lawyer", city="Prague",
         look=dict(skin=2, hair=0, style="bun", eyes="lines", mouth="smile", extra="glasses")),
    dict(name="Hugo Silva", job="painter", city="Lisbon",
         look=dict(skin=3, hair=1, style="spiky", eyes="squares", mouth="open", extra="none")),
]

VISUAL_QUESTION = "Who is in this image?"
JOB_QUESTION = "What is the job of {name}?"
CITY_QUESTION = "Where does {name} live?"
FACE_SIZE = 64  # pictures are drawn at 64x64; each processor resizes

# How the shipped demo checkpoints were made (scripts/build_demo.py). Training
# pictures come from a stream of their own, so no seed given to write_folder
# ever reproduces them; eval_seed is the held-out set the build script scores.
DEMO = dict(init_seed=0, train_seed=1, eval_seed=1001, n_visual=32, threads=1,
            steps={"llava": 1000, "qwen2_vl": 1500}, lr={"llava": 3e-3, "qwen2_vl": 5e-3})


def slug(person_index: int) -> str:
    """Folder name of a person: 'Alice Moreau' -> 'alice-moreau'."""
    return PEOPLE[person_index]["name"].lower().replace(" ", "-")


def visual_fact(person_index: int) -> tuple[str, str]:
    """The (question, answer) asked about a picture of this person."""
    return VISUAL_QUESTION, PEOPLE[person_index]["name"]


def text_facts(person_index: int) -> list[tuple[str, str]]:
    """The text-only (question, answer) facts about this person."""
    p = PEOPLE[person_index]
    return [(JOB_QUESTION.format(name=p["name"]), p["job"]),
            (CITY_QUESTION.format(name=p["name"]), p["city"])]


def all_text_facts(people_indices=None) -> list[tuple[int, str, str]]:
    """(person_index, question, answer) for every text fact of these people (default: all)."""
    idx = range(len(PEOPLE)) if people_indices is None else people_indices
    return [(i, q, a) for i in idx for q, a in text_facts(i)]


def world_dict() -> dict:
    """The world as plain JSON-able data."""
    return dict(
        visual_question=VISUAL_QUESTION,
        people=[dict(index=i, slug=slug(i), name=p["name"], job=p["job"], city=p["city"],
                     look=p["look"], text_facts=[list(f) for f in text_facts(i)])
                for i, p in enumerate(PEOPLE)],
    )


# ---------------------------------------------------------------------------
# Faces
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _identity(person_index: int, size: int) -> Image.Image:
    return _draw_identity(PEOPLE[person_index]["look"], size)


def _draw_identity(look: dict, size: int) -> Image.Image:
    """The person's cartoon on a transparent square canvas (no randomness)."""
    s = size / 64.0
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    box = lambda x0, y0, x1, y1: [round(x0 * s), round(y0 * s), round(x1 * s), round(y1 * s)]
    skin, hair = SKIN[look["skin"]], HAIR[look["hair"]]
    style = look["style"]
    # hair behind the head
    if style == "bun":
        d.ellipse(box(24, 2, 40, 16), fill=hair)
    if style == "side":
        d.rectangle(box(13, 14, 22, 46), fill=hair)
    d.ellipse(box(16, 12, 48, 54), fill=skin)  # head
    # hair on top of the head
    if style == "flat":
        d.rectangle(box(15, 9, 49, 22), fill=hair)
    elif style == "side":
        d.pieslice(box(14, 9, 50, 37), 180, 360, fill=hair)
        d.rectangle(box(14, 18, 26, 26), fill=hair)
    elif style == "spiky":
        for x in (16, 24, 32, 40):
            d.polygon([(x * s, 22 * s), ((x + 4) * s, 4 * s), ((x + 8) * s, 22 * s)], fill=hair)
    elif style == "bun":
        d.pieslice(box(16, 10, 48, 34), 180, 360, fill=hair)
    # eyes
    dark = (20, 20, 40)
    for cx in (25, 39):
        if look["eyes"] == "dots":
            d.ellipse(box(cx - 3, 27, cx + 3, 33), fill=dark)
        elif look["eyes"] == "squares":
            d.rectangle(box(cx - 3, 27, cx + 3, 33), fill=(30, 90, 200))
        else:  # lines
            d.rectangle(box(cx - 4, 29, cx + 4, 31), fill=dark)
    # mouth
    if look["mouth"] == "smile":
        d.arc(box(24, 34, 40, 47), 20, 160, fill=(170, 30, 40), width=max(1, round(2 * s)))
    elif look["mouth"] == "line":
        d.rectangle(box(25, 43, 39, 45), fill=(120, 30, 30))
    else:  # open
        d.ellipse(box(28, 40, 36, 48), fill=(90, 10, 20))
    # accessory
    if look["extra"] == "glasses":
        for cx in (25, 39):
            d.ellipse(box(cx - 6, 24, cx + 6, 36), outline=(230, 230, 235), width=max(1, round(2 * s)))
        d.line(box(31, 30, 33, 30), fill=(230, 230, 235), width=max(1, round(2 * s)))
    elif look["extra"] == "beard":
        d.chord(box(18, 30, 46, 56), 20, 160, fill=hair)
    return img


def draw_face(person_index: int, rng: np.random.Generator, size: int = FACE_SIZE) -> Image.Image:
    """One random RGB picture (size x size) of person `person_index`.

    Random per picture: background colour and gradient, shift (+-12% of the
    size), scale (0.85-1.1), tilt (+-10 degrees), brightness, contrast, colour
    cast and Gaussian pixel noise.
    """
    return paint_face(_identity(person_index, size * 2), rng, size)


def paint_face(big: Image.Image, rng: np.random.Generator, size: int = FACE_SIZE) -> Image.Image:
    """`draw_face` for any identity drawing (`_draw_identity(look, 2 * size)`): the random picture."""
    # background: a random muted colour with a random linear gradient
    base = rng.uniform(60, 200, size=3)
    grad = rng.uniform(-40, 40, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    t = (math.cos(angle) * xx + math.sin(angle) * yy)[..., None]
    bg = np.clip(base + grad * 2 * t, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(bg, "RGB")
    # the face, drawn large then resampled with a random similarity transform
    scale = rng.uniform(0.85, 1.1)
    tilt = rng.uniform(-10, 10)
    side = max(1, round(size * scale))
    face = big.resize((side, side), Image.BILINEAR).rotate(tilt, resample=Image.BILINEAR)
    max_shift = 0.12 * size
    dx, dy = rng.uniform(-max_shift, max_shift, size=2)
    x0 = round((size - side) / 2 + dx)
    y0 = round((size - side) / 2 + dy)
    canvas.paste(face, (x0, y0), face)
    # lighting: contrast around the mean, brightness, colour cast; then noise
    a = np.asarray(canvas, dtype=np.float32)
    contrast = rng.uniform(0.7, 1.3)
    brightness = rng.uniform(0.75, 1.25)
    cast = rng.uniform(0.9, 1.1, size=3)
    a = (a - a.mean()) * contrast + a.mean()
    a = a * brightness * cast
    a = a + rng.normal(0.0, 8.0, size=a.shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")


def write_folder(root, people_indices, n_pictures: int, seed: int,
                 with_qa: bool = True) -> list[Path]:
    """Write pictures in fastunlearn's forget/retain folder format.

    root/<person-slug>/<k>.png for k in 0..n_pictures-1, and with `with_qa`
    one root/<person-slug>/qa.jsonl with a line per picture:
    {"image": "<k>.png", "question": "Who is in this image?", "answer": "<Name>"}.
    Pictures depend only on (seed, person index, k): other seeds give other
    pictures (use distinct seeds for training and held-out sets).
    Returns the person folders written.
    """
    root = Path(root)
    folders = []
    for i in people_indices:
        folder = root / slug(i)
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, i])
        lines = []
        for k in range(n_pictures):
            draw_face(i, rng).save(folder / f"{k}.png", optimize=False)
            q, a = visual_fact(i)
            lines.append(dict(image=f"{k}.png", question=q, answer=a))
        if with_qa:
            with open(folder / "qa.jsonl", "w", encoding="utf-8") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")
        folders.append(folder)
    return folders


def demo_assets_dir() -> Path:
    """Where the shipped demo checkpoints live (fastunlearn/demo_assets)."""
    return Path(__file__).resolve().parents[1] / "demo_assets"
