"""Forget / retain folders -> validated items.

    DIR/**/*.{png,jpg,jpeg,webp,bmp}   pictures (any depth)
    DIR/**/*.jsonl                     optional: {"image": "<path relative to the jsonl>",
                                                  "question": "...", "answer": "..."} a line

Optional fields of a line, for benchmark questions (`fastunlearn evaluate`):
    "kind": "generation" (the default: an open question and its reference answer) |
            "choice" (multiple choice: "options" {"A": "...", "B": "...", ...} in the order shown,
                      "answer" the TEXT of the correct option, which must match exactly one) |
            "cloze" (fill in the blank: "question" with the blank written "__", "answer" the
                     words that fill it)
The job trains on generation lines only (TRAINABLE_KINDS); read_folder returns the kinds asked
for. The answer of a choice line is the option's text, not its letter, so that every line stays a
true (question, answer) pair for readers that know no kinds.

An image with QA lines (of the kinds asked for) uses them; an image without any gets
DEFAULT_QUESTIONS with answer None (the job fills in the original model's own greedy answer).
Nothing outside DIR is read: image paths that escape it (../, absolute paths, symlinks pointing
out) are refused.
"""
from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_QUESTIONS = ("Who is in this image?", "Describe this image.")
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb bound; real photos are far below it
MAX_JSONL_LINE = 1 << 20
# Decoders by content, whatever the suffix: only these (PIL's others include EPS, which runs Ghostscript)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
KINDS = ("generation", "choice", "cloze")
TRAINABLE_KINDS = ("generation",)  # a choice letter or a blank's filler is no answer to train on


@dataclass
class Item:
    image: Path | None  # None for a text-only item
    question: str
    answer: str | None  # None: use the original model's greedy answer
    subject: str  # first folder under DIR ("" for files at its top)
    kind: str = "generation"
    options: dict[str, str] | None = None  # choice: letter -> option text, in the order shown


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB, or raise UserError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise UserError(f"{path}: image too large ({im.width}x{im.height} pixels)")
                im.load()
                return im.convert("RGB")
    except UserError:
        raise
    except Image.UnidentifiedImageError:
        raise UserError(f"{path}: unreadable image (not a {', '.join(IMAGE_FORMATS)} picture)") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: unreadable image ({str(e)[:200]})") from None


def anchor_items(folder) -> list[Item]:
    """One item per picture of an --anchor folder (its questions, if any, are not used)."""
    return first_question_only(read_folder(Path(folder), "anchor"))


def first_question_only(items: list[Item]) -> list[Item]:
    """The first item of each picture (text items, with no picture, count as one)."""
    seen, out = set(), []
    for it in items:
        if it.image not in seen:
            seen.add(it.image)
            out.append(it)
    return out


def forget_folders(forget_dir) -> list[Path]:
    """The forget requests of one job: a folder, a list of folders, or a manifest file (one folder a
    line, relative to the manifest; blank lines and # comments skipped)."""
    dirs = [forget_dir] if isinstance(forget_dir, (str, Path)) else list(forget_dir)
    if not dirs:
        raise UserError("no forget folder given")
    out = []
    for d in map(Path, dirs):
        if d.is_file():
            try:
                if d.stat().st_size > 1 << 20:
                    raise UserError(f"{d}: a file, not a folder; too large for a manifest (one forget folder a line)")
                lines = d.read_bytes().decode("utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{d}: a file, not a folder; not usable as a manifest (one forget folder a line: "
                                f"{e.__class__.__name__})") from None
            listed = [d.parent / line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not listed:
                raise UserError(f"{d}: manifest lists no forget folder")
            out += listed
        else:
            out.append(d)
    return out


def read_folder(folder: Path, role: str = "forget", kinds=TRAINABLE_KINDS) -> list[Item]:
    """The items of a forget / retain folder: its QA lines of the given kinds (every line is
    validated, whatever its kind), and the default questions for pictures with none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: {role} folder does not exist or is not a folder")
    root = folder.resolve()
    images, jsonls = [], []
    for path in sorted(root.rglob("*")):  # symlinked folders are not walked into, but refused too
        if (path.is_symlink() or path.is_file()) and not _inside(root, path):
            raise UserError(f"{path}: links outside the {role} folder; refusing to read it")
        if not path.is_file():  # folders, FIFOs, devices, dangling links: skipped, never opened
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif path.suffix.lower() == ".jsonl":
            jsonls.append(path)
    if not images:
        raise UserError(f"{folder}: no images in the {role} folder (expected *.png, *.jpg, *.jpeg, *.webp or *.bmp at any depth)")

    qa: dict[Path, list[tuple]] = {}
    for jsonl in jsonls:
        for image, question, answer, kind, options in _read_jsonl(root, jsonl):
            if kind in kinds:
                qa.setdefault(image, []).append((question, answer, kind, options))

    items = []
    for image in images:
        load_image(image)  # validate now: a bad picture fails the job before any work
        rel = image.relative_to(root)
        subject = rel.parts[0] if len(rel.parts) > 1 else ""
        lines = qa.get(image) or [(q, None, "generation", None) for q in DEFAULT_QUESTIONS]
        items += [Item(image, q, a, subject, kind, options) for q, a, kind, options in lines]
    return items


def kind_and_options(obj: dict, where: str) -> tuple[str, dict[str, str] | None]:
    """A QA line's optional "kind" and "options", validated (see the module docstring)."""
    kind = obj.get("kind", "generation")
    if kind not in KINDS:
        raise UserError(f"{where}: 'kind' must be one of {', '.join(KINDS)} (got {str(kind)[:50]!r})")
    if kind != "choice":
        return kind, None
    options = obj.get("options")
    if (not isinstance(options, dict) or len(options) < 2
            or not all(isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() for k, v in options.items())):
        raise UserError(f"{where}: a choice line needs 'options', an object of at least two non-empty strings "
                        '(e.g. {"A": "...", "B": "..."})')
    options = {k.strip(): v.strip() for k, v in options.items()}
    if list(options.values()).count(obj["answer"].strip()) != 1:
        raise UserError(f"{where}: 'answer' of a choice line must be the text of exactly one of its options")
    return kind, options


def _lines(jsonl: Path):
    """(line number, bytes) of a jsonl file, read a line at a time: a huge line is refused after
    reading MAX_JSONL_LINE bytes of it, never held whole."""
    try:
        with open(jsonl, "rb") as f:
            lineno = 0
            while line := f.readline(MAX_JSONL_LINE + 1):
                lineno += 1
                if len(line) > MAX_JSONL_LINE:
                    raise UserError(f"{jsonl}:{lineno}: line longer than {MAX_JSONL_LINE} bytes")
                yield lineno, line
    except OSError as e:
        raise UserError(f"{jsonl}: cannot read ({e.strerror})") from None


def _read_jsonl(root: Path, jsonl: Path):
    for lineno, line in _lines(jsonl):
        where = f"{jsonl}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:
            raise UserError(f"{where}: not usable JSON ({str(e)[:100]})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object with image, question and answer")
        if "image" not in obj and jsonl.name.endswith(".text.jsonl"):  # convert writes these beside a split, not in it
            raise UserError(f"{where}: a text-only question file (no pictures) inside the folder; give the split's "
                            "own folder, and the text file with --text")
        for key in ("image", "question", "answer"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise UserError(f"{where}: {key!r} must be a non-empty string")
        if "\0" in obj["image"]:
            raise UserError(f"{where}: image path holds a NUL character")
        rel = Path(obj["image"])
        if rel.is_absolute() or not _inside(root, jsonl.parent / rel):
            raise UserError(f"{where}: image {obj['image'][:200]!r} is outside the folder")
        image = (jsonl.parent / rel).resolve()
        if not image.is_file():
            raise UserError(f"{where}: image {obj['image']!r} does not exist")
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{where}: {obj['image']!r} is not a picture ({', '.join(sorted(IMAGE_SUFFIXES))})")
        kind, options = kind_and_options(obj, where)
        yield image, obj["question"].strip(), obj["answer"].strip(), kind, options


def augmented_view(image: Image.Image, key: str) -> Image.Image:
    """A photometric and geometric variant of a picture, deterministic in `key`: small shift,
    scale and tilt, mirror, brightness and contrast. Erasing from several views of each picture
    makes the erasure hold on pictures the job never saw."""
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    w, h = image.size
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    scale = rng.uniform(0.9, 1.1)
    shift = (rng.uniform(-0.08, 0.08) * w, rng.uniform(-0.08, 0.08) * h)
    fill = image.getpixel((0, 0))
    image = image.rotate(rng.uniform(-8, 8), Image.BILINEAR, translate=shift, fillcolor=fill)
    crop_w, crop_h = w / scale, h / scale
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    image = image.transform((w, h), Image.EXTENT, (left, top, left + crop_w, top + crop_h), Image.BILINEAR,
                            fillcolor=fill)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))
