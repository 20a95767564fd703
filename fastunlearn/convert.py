"""Benchmark datasets (Hugging Face parquet) -> fastunlearn forget / retain folders.

    fastunlearn convert mllmu-bench|clear SRC OUT_DIR [--split NAME ...]

SRC is a local copy of the dataset as downloaded from the Hub: parquet files at any depth, one
config per folder (`forget_5/train-00000-of-00001.parquet`, or the parquet-converter layout
`forget05/train/0000.parquet`). Every parquet group (a config, plus its split when that is not
`train`) becomes one folder OUT_DIR/<split>/, usable as FORGET_DIR or --retain DIR:

    OUT_DIR/<split>/<person>/<row>.<png|jpg|webp|bmp>   the picture bytes as stored
    OUT_DIR/<split>/<person>/qa.jsonl                   {"image": "<row>.png", "question", "answer",
                                                         "kind"[, "options"]} (fastunlearn.data)
    OUT_DIR/<split>.text.jsonl                          text-only questions, {"question", "answer",
                                                         "kind"[, "options"], "subject"} (only when
                                                         the split has some)

(no <person> level where the split names no one). The text file sits beside the split's folder,
not in it: its lines have no picture, so a forget folder must not hold them; `verify --text` and
`evaluate --text` read it. Which columns become what (schemas.py):

MLLMU-Bench (github.com/franciscoliu/MLLMU-Bench, eval.py and data_process/data_preprocess.py):
  - profile splits (forget_N, retain_N, Full_Set, Retain_Set, Test_Set): columns `ID`, `image`
    (or `images`, the list of extra pictures of Test_Set), `Generation_Task`, and, when present,
    `Classification_Task` and `Mask_Task`. Person = `ID`. Every task is kept: `Generation_Task`
    entries (`Question` -> question, `Ground_Truth` -> answer) are "generation" lines,
    `Classification_Task` questions (`Question`, `Options` {A..D}, `Correct_Answer` a letter) are
    "choice" lines whose answer is the correct option's text, `Mask_Task` entries (`Question`
    with "__", `Ground_Truth`) are "cloze" lines. Entries of `Type` "Image_Textual" (and
    `Image_Textual_Questions`) go with each of the row's pictures; "Pure_Text" ones (and
    `Pure_Text_Questions`) go, once per row, to the split's text file. Entries that are malformed
    (no question or answer, a correct letter that is no option, two options with the correct
    text) are counted as skipped.
  - training splits (ft_Data, and the forget_N / retain_N of MLLMMU/baseline_train_split):
    columns `image` and `metadata` (a JSON list of {"Question", "Answer"}); person = `ID` if
    present.
CLEAR (github.com/somvy/multimodal_unlearning mm/dataset.py, mm/eval.py; HF therem/CLEAR):
  - forgetNN, retainNN, full, *_perturbed, *+tofu: columns `image` and `caption` (and `name`).
    Person = `name`; QA = ("Who is in this image?", name) and ("Describe this image.", caption).
    Rows without a picture (the TOFU text questions of the +tofu configs) give their `question`
    and `answer` to the text file.
  - real_faces / real_world: columns `image` and `answer` (and `question`; without it the
    question is "Who is in this image?").

Nothing is written unless the whole conversion succeeds: it goes to a temporary sibling of
OUT_DIR, renamed at the end. Names from the data become folder names only after sanitising;
image paths stored in the data are never used.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .schemas import pick_schema

KINDS = ("mllmu-bench", "clear")
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}
MAX_LINE = 1 << 20  # fastunlearn.data refuses longer jsonl lines
SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(-[0-9a-f]+)?$")  # train-00000-of-00001[-hash]
OUR_FILE = re.compile(r"^(\d{6}(_\d+)?\.[a-z]+|qa\.jsonl)$")


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet needs pyarrow: pip install 'fastunlearn[convert]'") from None
    return pq


# --- finding the splits -------------------------------------------------------------------------

def safe_name(name, fallback: str = "unnamed") -> str:
    """A folder name from untrusted text: letters, digits, '-', '_', '.', '+' only; no leading
    dot (so never '.' or '..'); at most 100 characters."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name)).strip("._")[:100].strip("._")
    return name or fallback


def find_splits(src: Path) -> dict[str, list[Path]]:
    """{split name: its parquet files} under SRC (hidden folders such as .git / .cache skipped)."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: not a folder (expected a local copy of the dataset with its parquet files)")
    splits: dict[str, list[Path]] = {}
    for path in sorted(src.rglob("*.parquet")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        parts = list(rel.parts[:-1])
        m = SHARD.match(path.stem)
        if m:
            parts.append(m["split"])
        if len(parts) > 1 and parts[-1] == "train":  # one split per config in these benchmarks
            parts.pop()
        if not parts or parts == ["train"]:
            parts = [src.resolve().name]
        splits.setdefault(safe_name("_".join(parts), "train"), []).append(path)
    if not splits:
        raise UserError(f"{src}: no parquet files in it (download the dataset's files, e.g. with huggingface-cli download)")
    return splits


def _open(path: Path, pq):
    with open(path, "rb") as f:
        if f.read(24).startswith(b"version https://git-lfs"):
            raise UserError(f"{path}: a Git LFS pointer, not the data (run `git lfs pull` in the dataset folder)")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise UserError(f"{path}: not a readable parquet file ({str(e)[:200]})") from None


def _rows(pf, path: Path):
    """The rows of a parquet file as dicts, a few at a time (pictures make rows large)."""
    batches = pf.iter_batches(batch_size=32)
    while True:
        try:
            batch = next(batches, None)
            rows = batch.to_pylist() if batch is not None else None
        except Exception as e:  # pyarrow: ArrowInvalid, ArrowIOError, ...
            raise UserError(f"{path}: cannot read the parquet data ({str(e)[:200]})") from None
        if rows is None:
            return
        yield from rows


# --- writing ------------------------------------------------------------------------------------

def _image_bytes(cell) -> bytes | None:
    """The picture bytes of a cell (HF Image feature {"bytes", "path"}, or plain bytes); None if
    the row has no picture. A path-only cell is refused: paths from the data are never followed."""
    if cell is None:
        return None
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        if cell.get("path"):
            raise ValueError("picture not embedded (the row stores only a path)")
        return None
    raise ValueError(f"picture cell of unexpected type {type(cell).__name__}")


def _image_suffix(data: bytes) -> str:
    """The suffix for these bytes, after checking that they decode as a picture fastunlearn reads."""
    from PIL import Image

    from .data import IMAGE_FORMATS, load_image

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            fmt = im.format
    except Exception:
        raise ValueError(f"unreadable picture (not a {', '.join(IMAGE_FORMATS)} picture)") from None
    try:
        load_image(io.BytesIO(data))  # full decode, size bound: the checks `apply` makes
    except UserError as e:
        raise ValueError(str(e).split(": ", 1)[-1]) from None
    return SUFFIX[fmt]


class _People:
    """Person folder names: sanitised, and distinct for distinct raw names (case-insensitively)."""

    def __init__(self):
        self.by_raw: dict[str, str] = {}
        self.used: set[str] = set()

    def folder(self, raw) -> str:
        if raw is None or not str(raw).strip():
            return ""
        raw = str(raw).strip()
        if raw not in self.by_raw:
            name = safe_name(raw)
            if name.lower() in self.used or OUR_FILE.match(name.lower()):  # never a picture's name
                name = f"{name[:90]}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"
            self.used.add(name.lower())
            self.by_raw[raw] = name
        return self.by_raw[raw]


def _json_line(line: dict, where: str) -> str:
    text = json.dumps(line, ensure_ascii=False)
    if len(text.encode()) >= MAX_LINE:
        raise UserError(f"{where}: question and answer longer than {MAX_LINE} bytes")
    return text


def convert_split(kind: str, name: str, files: list[Path], out: Path, bar=None) -> dict:
    """Write one split's folder `out` (and its text file beside it) from its parquet files;
    returns its counts."""
    pq = _pq()
    counts = dict(rows=0, people=0, pictures=0, qa=0, generation=0, choice=0, cloze=0, text_qa=0,
                  pictures_without_qa=0, skipped_no_picture=0, skipped_questions=0)
    people, lines, text_lines = _People(), {}, []
    out.mkdir()
    for path in files:
        pf = _open(path, pq)
        fn = pick_schema(kind, pf.schema_arrow.names, str(path))
        for i, row in enumerate(_rows(pf, path)):
            where = f"{path}: row {i}"
            try:
                person, cells, qa, text, skipped = fn(row)
                pictures = [b for b in map(_image_bytes, cells or []) if b is not None]
                suffixes = [_image_suffix(b) for b in pictures]
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
            counts["skipped_questions"] += skipped
            folder = people.folder(person)
            text_lines += [_json_line({**t, "subject": folder} if folder else t, where) for t in text]
            counts["text_qa"] += len(text)
            if not pictures:
                counts["skipped_no_picture"] += 1
            else:
                (out / folder).mkdir(exist_ok=True)
                for k, (data, suffix) in enumerate(zip(pictures, suffixes)):
                    file = f"{counts['rows']:06d}" + (f"_{k}" if len(pictures) > 1 else "") + suffix
                    (out / folder / file).write_bytes(data)
                    lines.setdefault(folder, []).extend(_json_line({"image": file, **q}, where) for q in qa)
                counts["pictures"] += len(pictures)
                counts["qa"] += len(qa) * len(pictures)
                for q in qa:
                    counts[q["kind"]] += len(pictures)
                trainable = any(q["kind"] == "generation" for q in qa)
                counts["pictures_without_qa"] += 0 if trainable else len(pictures)
            counts["rows"] += 1
            if bar is not None:
                bar.update(1)
    for folder, folder_lines in lines.items():
        (out / folder / "qa.jsonl").write_text("\n".join(folder_lines) + "\n", encoding="utf-8")
    counts["people"] = len(people.by_raw)
    if not counts["pictures"]:
        raise UserError(f"split {name}: no pictures in it (only text rows); leave it out with --split")
    if text_lines:
        text_file(out).write_text("\n".join(text_lines) + "\n", encoding="utf-8")
    return counts


def text_file(split_folder: Path) -> Path:
    """Where a split's text-only questions go: beside its folder, OUT_DIR/<split>.text.jsonl."""
    return split_folder.parent / f"{split_folder.name}.text.jsonl"


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; give a new or empty folder")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: folder does not exist")


def convert(kind: str, src, out, splits=None) -> dict:
    """Convert the dataset copy at `src` into forget / retain folders under `out` (which must not
    exist or be empty). `splits`: the split names to convert (default: all found). Returns
    {"kind", "out", "splits": {name: counts}}."""
    from tqdm import tqdm

    if kind not in KINDS:
        raise UserError(f"unknown benchmark {kind!r}: expected one of {', '.join(KINDS)}")
    src, out = Path(src), Path(out)
    _check_out(out)
    found = find_splits(src)
    if splits:
        unknown = [s for s in splits if s not in found]
        if unknown:
            raise UserError(f"no split {', '.join(unknown)} in {src} (found: {', '.join(found)})")
        found = {s: found[s] for s in found if s in splits}
    pq = _pq()
    total = 0
    for files in found.values():  # check every schema before writing anything
        for path in files:
            pf = _open(path, pq)
            pick_schema(kind, pf.schema_arrow.names, str(path))
            total += pf.metadata.num_rows
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        summary = {}
        with tqdm(total=total, unit="row", desc="convert", disable=None) as bar:
            for name, files in found.items():
                summary[name] = convert_split(kind, name, files, tmp / name, bar)
        os.chmod(tmp, 0o777 & ~_umask())
        if out.is_dir():
            out.rmdir()  # empty (checked above); a file appearing meanwhile makes this fail
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out}: cannot write the converted dataset ({e.strerror or e}); nothing written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"kind": kind, "out": str(out), "splits": summary}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
