"""Items -> cached samples: each picture (and each augmented view of it) goes through the frozen
vision tower once; its pre-projector features are kept in memory up to a budget, then on disk.
The vision tower is dropped afterwards. Items without an answer get the model's own greedy one."""
from __future__ import annotations

import contextlib
import linecache
import os
import random
import re
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import safetensors_io as st
from .config import progress
from .data import Item, augmented_view, load_image
from .errors import UserError
from .ranks import ONE_PROCESS, Ranks

if TYPE_CHECKING:
    from .load import Loaded


FEATURE_MEMORY_MB = 2048  # cached vision features kept in memory; beyond it they go to a temporary folder


PIXEL_CACHE_PICTURES = 8  # processed views kept for reuse (a picture's questions and views come together)


def feature_budget_bytes() -> int:
    """FASTUNLEARN_FEATURE_MEMORY_MB (default FEATURE_MEMORY_MB) in bytes; 0 sends every feature to disk."""
    raw = os.environ.get("FASTUNLEARN_FEATURE_MEMORY_MB", str(FEATURE_MEMORY_MB))
    try:
        return int(float(raw) * 2**20)
    except ValueError:
        raise UserError(f"FASTUNLEARN_FEATURE_MEMORY_MB={raw!r}: expected a number of megabytes") from None


class SpilledFeatures:
    """One picture's features in a raw file, read back on each use. Stands in for the tensor where
    the job uses it (`.to()`, `.shape`, `.dtype`), so memory holds only the batch being computed."""

    def __init__(self, folder: tempfile.TemporaryDirectory, index: int, t: torch.Tensor):
        self._folder = folder  # keeps the folder alive while any sample refers to it
        self.path = Path(folder.name) / f"{index}.raw"
        self.shape, self.dtype = tuple(t.shape), t.dtype
        with open(self.path, "wb") as f:
            f.write(st.tensor_to_bytes(t))

    def load(self) -> torch.Tensor:
        data = bytearray(self.path.read_bytes())
        return torch.frombuffer(data, dtype=self.dtype).reshape(self.shape) if data else torch.empty(self.shape, dtype=self.dtype)

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.load().to(*args, **kwargs)


class FeatureCache:
    """Vision features by (picture, view): in memory up to a byte budget, then in a temporary folder."""

    def __init__(self, budget: int):
        self.budget, self.in_memory = budget, 0
        self.entries: dict = {}
        self.folder: tempfile.TemporaryDirectory | None = None

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __getitem__(self, key):
        return self.entries[key]

    def __setitem__(self, key, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.in_memory + size <= self.budget:
            self.in_memory += size
            self.entries[key] = t
            return
        if self.folder is None:
            self.folder = tempfile.TemporaryDirectory(prefix="fastunlearn-features-")
        self.entries[key] = SpilledFeatures(self.folder, len(self.entries), t.cpu())

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.in_memory = 0


@dataclass
class Sample:
    input_ids: torch.Tensor  # [L]
    answer_start: int
    features: torch.Tensor | SpilledFeatures | None  # cached pre-projector vision features, [tokens, d]
    grid: dict | None  # family-specific image layout (e.g. image_grid_thw), no pixels
    view: int = 0  # 0: the picture itself; k > 0: its k-th augmented variant (training only)

    @property
    def answer_tokens(self) -> int:
        return len(self.input_ids) - self.answer_start


@dataclass
class RemoteSample:
    """A sample another rank owns (torchrun): enough to place it in batches and normalise the loss."""

    view: int
    answer_tokens: int
    owner: int


def picture_numbers(items: list[Item]) -> list[int]:
    """Each item's picture, numbered in order of first appearance (a text item is a picture of its
    own). Ranks own pictures by number, so all of a picture's questions and views go to one rank and
    its features are computed once."""
    numbers: dict = {}
    return [numbers.setdefault(it.image if it.image is not None else ("text", i), len(numbers))
            for i, it in enumerate(items)]


def widest_share(samples: list) -> int:
    """The most of `samples` any one rank holds (all of them on one process)."""
    held: dict = {}
    for s in samples:
        owner = s.owner if isinstance(s, RemoteSample) else "this rank"
        held[owner] = held.get(owner, 0) + 1
    return max(held.values(), default=0)


# code that runs the checkpoint's processor files: an exception raised in it is the checkpoint's problem
PROCESSOR_CODE = ("transformers.", "tokenizers", "jinja2", "PIL.")


@contextlib.contextmanager
def processor_errors(loaded: Loaded, image: Path | None):
    """An exception raised inside the checkpoint's processor, image processor, tokenizer or chat
    template (a setting left unset, a template that does not render) ends the job with one line
    naming the checkpoint, the processor and the setting involved, instead of a traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        frames = [frame for frame, _ in traceback.walk_tb(e.__traceback__)]
        if not any(str(f.f_globals.get("__name__", "")).startswith(PROCESSOR_CODE) for f in frames):
            raise  # not raised by the processor: a bug, shown with its traceback
        raise UserError(processor_failure(loaded, e, frames, image)) from None


def processor_failure(loaded: Loaded, error: Exception, frames: list, image: Path | None) -> str:
    """One line: checkpoint, processor class, what failed, and, when the failing line of the processor
    code reads a setting that is unset (None), that setting and the file that should hold it."""
    ckpt, processor = loaded.ckpt, loaded.processor
    name = getattr(loaded.adapter, "processor_class", "") or type(processor).__name__
    image_file = "preprocessor_config.json" if (ckpt / "preprocessor_config.json").exists() else "processor_config.json"
    parts = {id(processor): "processor_config.json", id(getattr(processor, "tokenizer", None)): "tokenizer_config.json",
             id(getattr(processor, "image_processor", None)): image_file}
    hint = ""
    for frame in reversed(frames):  # the innermost frame of the processor's own code that reads an unset setting
        owner = frame.f_locals.get("self")
        if id(owner) not in parts:
            continue
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        unset = [m.group(2) for m in re.finditer(r"\b(self\.)?([A-Za-z_]\w*)", line)
                 if (getattr(owner, m.group(2), 0) if m.group(1) else frame.f_locals.get(m.group(2), 0)) is None]
        if unset:
            hint = f"; {unset[0]} is not set: add it to {ckpt / parts[id(owner)]}"
            break
    if not hint and any(str(f.f_globals.get("__name__", "")).startswith("jinja2") for f in frames):
        hint = "; its chat template does not render (chat_template.jinja, chat_template.json or tokenizer_config.json)"
    message = (str(error).strip().splitlines() or [""])[0][:200]
    picture = f" on {image}" if image is not None else ""
    return (f"{ckpt}: the checkpoint's {name} failed{picture} ({error.__class__.__name__}: {message}){hint}; "
            "fix the checkpoint's processor files")


def _encode(loaded: Loaded, pixel: dict | None, question: str, answer: str | None, image: Path | None):
    """adapter.encode (chat template, placeholder expansion, tokenizer), its processor errors in one line."""
    with processor_errors(loaded, image):
        return loaded.adapter.encode(loaded.processor, loaded.model.config, pixel, question, answer)


def _pixels(loaded: Loaded, image: Path, view: int = 0, seed: int = 0) -> dict:
    """Processor inputs of a picture (view 0) or of its augmented view `view` (keyed by content).
    Only the last few are kept: items come grouped by picture, and a folder may not fit in memory."""
    cache = loaded.pixel_cache
    if (image, view) in cache:
        cache.move_to_end((image, view))
    else:
        picture = load_image(image)
        if view:
            digest = st.sha256_file(image)
            picture = augmented_view(picture, f"{digest}:{seed}:{view}")
        with processor_errors(loaded, image):
            cache[image, view] = loaded.adapter.pixel_inputs(loaded.processor, picture)
        while len(cache) > PIXEL_CACHE_PICTURES:
            cache.popitem(last=False)
    return cache[image, view]


@torch.no_grad()
def greedy_answers(loaded: Loaded, items: list[Item], max_new_tokens: int) -> list[str]:
    """The model's own greedy answer to each item's question (the target to forget when none is given)."""
    model, adapter, tokenizer = loaded.model, loaded.adapter, loaded.processor.tokenizer
    answers = []
    for item in progress(items, desc="greedy answers"):
        pixel = _pixels(loaded, item.image) if item.image is not None else None
        enc = _encode(loaded, pixel, item.question, None, item.image)
        inputs = adapter.generate_inputs(model, enc.input_ids.to(loaded.device), pixel)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, len(enc.input_ids):], skip_special_tokens=True).strip())
    return answers


def fill_answers(loaded: Loaded, items: list[Item], max_new_tokens: int, ranks: Ranks = ONE_PROCESS) -> list[Item]:
    """Items without an answer get the model's greedy one, each rank generating its own pictures'
    and sharing them; items whose answer comes out empty are dropped."""
    pictures = picture_numbers(items)
    # a sharded LLM's layer calls are collectives: every rank generates every answer (the same tokens)
    mine = [i for i, it in enumerate(items) if it.answer is None and (ranks.sharded or ranks.owns(pictures[i]))]
    answers = greedy_answers(loaded, [items[i] for i in mine], max_new_tokens)
    for part in ranks.gather(list(zip(mine, answers)), "sharing the greedy answers"):
        for i, answer in part:
            items[i].answer = answer
    return [it for it in items if it.answer]


@torch.no_grad()
def cache_samples(loaded: Loaded, items: list[Item], desc: str, views: int = 0, seed: int = 0,
                  first_view: int = 0, extra_views: int = 0, ranks: Ranks = ONE_PROCESS) -> list:
    """Encode items and compute the vision features of each picture (and of `views` augmented
    variants of it, each a sample of its own) once. Views are numbered from `first_view` (0: the
    picture itself). A picture's views go through the tower in one call, together with the next
    `extra_views` views, whose features are only cached (for a later call that samples them).
    This rank computes its own pictures' samples (`ranks.owns`); the others' are RemoteSample stubs."""
    adapter, model = loaded.adapter, loaded.model
    if loaded.feature_cache is None:
        loaded.feature_cache = FeatureCache(feature_budget_bytes())
    pictures = picture_numbers(items)
    mine = [i for i in range(len(items)) if ranks.owns(pictures[i])]
    local = {}
    for i in progress(mine, desc=f"caching {desc} features"):
        item, samples = items[i], local.setdefault(i, [])
        if item.image is None:
            enc = _encode(loaded, None, item.question, item.answer, None)
            samples.append(Sample(enc.input_ids, enc.answer_start, None, None, 0))
            continue
        sampled = range(first_view, first_view + 1 + views)
        todo = [v for v in range(first_view, sampled.stop + extra_views) if (item.image, v) not in loaded.feature_cache]
        if todo:
            computed = adapter.vision_features_batch(model, [_pixels(loaded, item.image, v, seed) for v in todo])
            for view, features in zip(todo, computed):
                loaded.feature_cache[item.image, view] = features
        for view in sampled:
            pixel = _pixels(loaded, item.image, view, seed)
            grid = {k: v for k, v in pixel.items() if k != "pixel_values"}
            enc = _encode(loaded, pixel, item.question, item.answer, item.image)
            samples.append(Sample(enc.input_ids, enc.answer_start, loaded.feature_cache[item.image, view], grid, view))
    # every rank's samples in the order of `items`
    shared = [(i, j, s.view, s.answer_tokens) for i in mine for j, s in enumerate(local[i])]
    rows = sorted(row + (r,) for r, part in enumerate(ranks.gather(shared, "sharing the sample list")) for row in part)
    samples = [local[i][j] if r == ranks.rank else RemoteSample(view, tokens, r) for i, j, view, tokens, r in rows]
    ranks.keep_stand_in([s for s in samples if isinstance(s, Sample)])
    return samples


def drop_vision_tower(loaded: Loaded) -> None:
    """Features are cached: free the vision tower (and pixels) for the rest of the job."""
    loaded.adapter.drop_vision_tower(loaded.model)
    loaded.pixel_cache.clear()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()


def other_answer_samples(loaded: Loaded, items: list[Item], samples: list, views: int, pool: list[Item],
                         per_sample: int, seed: int) -> dict:
    """{id(sample): the same picture (view) and question with `per_sample` other answers that `pool` gives
    to the question}, for this rank's picture samples of `items` (cache_samples' order: 1 + views samples
    per picture item, 1 per text item). The answers are drawn per sample, seeded by the picture's bytes (the
    same folder copied elsewhere draws the same)."""
    answers: dict = {}
    for it in pool:
        if it.answer and it.answer not in answers.setdefault(it.question, []):
            answers[it.question].append(it.answer)
    expanded = [it for it in items for _ in range(1 if it.image is None else 1 + views)]
    out, digests = {}, {}
    for it, sample in zip(expanded, samples):
        if it.image is None or isinstance(sample, RemoteSample):
            continue
        others = sorted(a for a in answers.get(it.question, []) if a != it.answer)
        if it.image not in digests:
            digests[it.image] = st.sha256_file(it.image)
        rng = random.Random(f"{seed}:{digests[it.image]}:{it.question}:{sample.view}")
        pixel = _pixels(loaded, it.image, sample.view, seed)
        out[id(sample)] = [
            Sample(enc.input_ids, enc.answer_start, sample.features, sample.grid, sample.view)
            for enc in (_encode(loaded, pixel, it.question, a, it.image)
                        for a in rng.sample(others, min(per_sample, len(others))))]
    return out
