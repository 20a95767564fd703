"""The erasure job: cache -> reference -> mask -> optimise -> evaluate -> write.

Only the projector changes, so:
- vision features are computed once per image, then the vision tower is dropped;
- the reference model differs only in the projector: reference answer NLLs are computed once,
  with the original projector, and no second model is kept;
- the LLM, embeddings and lm_head are frozen (no grads, no optimizer state); gradients flow
  through their activations into fp32 master copies of the projector tensors, read from the
  stored bytes;
- only answer positions reach the lm_head (`linear_nll`), never full-sequence logits;
- AdamW updates only elements selected by the saliency mask; the rest stay bit-identical, so
  the stored delta is sparse and exact.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ck
from .data import Item, augmented_view, load_image, read_folder
from .errors import UserError
from . import stopping  # efficacy (issue 9)
from .guard import Guard  # efficacy (issue 9)
from .kernels import linear_nll, masked_adamw_
from .models import Adapter, adapter_for, stored_projector_names
from .objectives import METHODS, forget_loss, retain_nll, uses_retain


@dataclass
class Config:
    method: str = "npo"
    steps: int = 100  # with holdout > 0: at most; the held-out rule may stop earlier and keeps the best state
    lr: float = 1e-2
    beta: float = 0.5
    retain_weight: float = 3.0
    mask: str = "fisher"  # fisher | none
    mask_threshold: float = 1.0
    fisher_samples: int = 64
    batch_size: int = 16
    weight_decay: float = 0.0
    views: int = 4  # augmented variants of each picture, cached beside it
    max_new_tokens: int = 32
    device: str = "auto"
    seed: int = 0
    # ---- efficacy (issue 9): guard.py, anchor.py, nullspace.py, stopping.py; 0 turns each off
    anchor_weight: float = 0.0  # x relative squared change of the projector output on retain features
    anchor_pictures: int = 64  # retain pictures / views the anchor sees per step (0: all of them)
    forget_anchor_weight: float = 0.0  # x distance of forget pictures' visual tokens from the mean retain output
    nullspace_energy: float = 0.0  # project linear-layer updates off the top retain directions holding this energy
    max_relative_update: float = 0.0  # trust region: ||dW|| <= this x ||W|| per tensor
    holdout: float = 0.0  # fraction of forget / retain pictures set aside for the stopping rule and the warnings
    check_every: int = 5  # steps between held-out checks
    min_steps: int = 0  # no held-out check (so no stop, no state kept) before this step
    confirm_checks: int = 1  # consecutive checks at the target before stopping
    forget_target: float = -1.0  # held-out forget exact-answer accuracy to stop at; -1: chance
    forget_tolerance: float = 0.05  # warn when held-out forget accuracy > chance + this
    retain_tolerance: float = 0.02  # warn when held-out retain accuracy falls by more than this

    def check(self):
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.mask not in ("fisher", "none"):
            raise UserError(f"--mask {self.mask!r}: expected fisher or none")
        if self.views < 0:
            raise UserError("--views must be 0 or more")
        for name in ("steps", "batch_size", "fisher_samples", "max_new_tokens", "check_every", "confirm_checks"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0 or self.beta <= 0:
            raise UserError("--lr and --beta must be positive")
        if not 0 <= self.holdout < 1 or not 0 <= self.nullspace_energy <= 1:
            raise UserError("--holdout must be in [0, 1) and --nullspace-energy in [0, 1]")
        if self.anchor_weight < 0 or self.max_relative_update < 0:
            raise UserError("--anchor-weight and --max-relative-update must be 0 or more")


FEATURE_MEMORY_MB = 2048  # cached vision features kept in memory; beyond it they go to a temporary folder
PIXEL_CACHE_PICTURES = 8  # processed pictures kept for reuse (a picture's questions and views come together)


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
            f.write(ck.tensor_to_bytes(t))

    def load(self) -> torch.Tensor:
        data = bytearray(self.path.read_bytes())
        return torch.frombuffer(data, dtype=self.dtype).reshape(self.shape) if data else torch.empty(self.shape, dtype=self.dtype)

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.load().to(*args, **kwargs)


class BatchFeatures:
    """A batch's features, concatenated from disk on each use (see SpilledFeatures)."""

    def __init__(self, parts: list, device: torch.device):
        self.parts, self.device = parts, device

    def to(self, *args, **kwargs) -> torch.Tensor:
        loaded = [p.load() if isinstance(p, SpilledFeatures) else p for p in self.parts]
        return torch.cat(loaded).to(self.device).to(*args, **kwargs)


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


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor
    image_mask: torch.Tensor  # [B, L] True at image placeholder tokens
    features: torch.Tensor | BatchFeatures | None  # [sum image tokens, d] in sequence order
    position_ids: torch.Tensor | None
    answer_rows: torch.Tensor  # flat indices into [B*L] of hidden states that predict answer tokens
    targets: torch.Tensor  # answer token ids, one per row
    answer_seq: torch.Tensor  # which sequence each answer row belongs to
    lengths: torch.Tensor  # answer tokens per sequence (float)
    ref_nll: torch.Tensor | None = None


@dataclass
class Loaded:
    """A checkpoint opened for the job: the model (vision tower dropped after caching) and its parts."""

    ckpt: Path
    adapter: Adapter
    model: torch.nn.Module
    processor: object
    stored: dict[str, ck.TensorInfo]
    names: dict[str, str]  # projector module-relative name -> stored name
    original: dict[str, torch.Tensor]  # stored projector tensors, as stored
    device: torch.device
    pixel_cache: OrderedDict = field(default_factory=OrderedDict)  # the last PIXEL_CACHE_PICTURES pictures
    feature_cache: FeatureCache = field(default_factory=lambda: FeatureCache(feature_budget_bytes()))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def progress(iterable=None, **kw):
    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, **kw)


# ---------------------------------------------------------------- opening a checkpoint


def read_model_config(ckpt: Path):
    """config.json, checked against the supported families before transformers parses it."""
    from transformers import AutoConfig

    path = Path(ckpt) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e.__class__.__name__}: {e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise UserError(f"{path}: no model_type; is this a Hugging Face checkpoint?")
    adapter_for(raw["model_type"])  # names the supported families when there is no adapter
    try:
        return AutoConfig.from_pretrained(ckpt, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a config it cannot parse
        raise UserError(f"{path}: transformers cannot parse it ({str(e).splitlines()[0]})") from None


def inspect_checkpoint(ckpt: Path):
    """Validate a checkpoint folder without loading weights: (stored tensors, config, adapter)."""
    stored = ck.read_checkpoint(ckpt)
    config = read_model_config(ckpt)
    adapter = adapter_for(config.model_type)
    adapter.check_config(config)
    return stored, config, adapter


def open_checkpoint(ckpt: Path, device: torch.device) -> Loaded:
    from transformers import AutoModelForImageTextToText

    ckpt = Path(ckpt)
    stored, config, adapter = inspect_checkpoint(ckpt)
    # CPU computes in fp32 (bf16/fp16 matmuls are slow or missing there); CUDA in the stored dtype.
    dtype = torch.float32 if device.type == "cpu" else _stored_dtype(stored)
    try:
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{ckpt}: cannot load the model ({str(e).splitlines()[0]})") from None
    model.to(device).eval().requires_grad_(False)
    processor = adapter.load_processor(ckpt)

    module = dict(adapter.projector_module(model).named_parameters())
    names = stored_projector_names(adapter, list(module), list(stored))
    original = {}
    for name, stored_name in names.items():
        info = stored[stored_name]
        if tuple(module[name].shape) != info.shape:
            raise UserError(
                f"{stored_name}: config.json implies shape {tuple(module[name].shape)}, the checkpoint stores {info.shape}"
            )
        original[name] = ck.read_tensor(info)
    return Loaded(ckpt, adapter, model, processor, stored, names, original, device)


def _stored_dtype(stored: dict[str, ck.TensorInfo]) -> torch.dtype:
    counts: dict[str, int] = {}
    for info in stored.values():
        counts[info.dtype] = counts.get(info.dtype, 0) + (info.end - info.start)
    best = max((d for d in counts if d in ck.TORCH_DTYPES), key=counts.get, default="F32")
    return ck.TORCH_DTYPES[best]


def master_params(loaded: Loaded, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """fp32 copies of projector tensors on the job's device (exact: every stored dtype fits in fp32)."""
    tensors = loaded.original if tensors is None else tensors
    return {n: t.to(loaded.device, torch.float32).clone() for n, t in tensors.items()}


# ---------------------------------------------------------------- items -> cached samples


def _pixels(loaded: Loaded, image: Path, view: int = 0, seed: int = 0) -> dict:
    """Processor inputs of a picture (view 0) or of its augmented view `view` (keyed by content).
    Only the last few are kept: items come grouped by picture, and a folder may not fit in memory."""
    cache = loaded.pixel_cache
    if (image, view) in cache:
        cache.move_to_end((image, view))
    else:
        picture = load_image(image)
        if view:
            digest = hashlib.sha256(image.read_bytes()).hexdigest()
            picture = augmented_view(picture, f"{digest}:{seed}:{view}")
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
        enc = adapter.encode(loaded.processor, model.config, pixel, item.question, None)
        inputs = adapter.generate_inputs(model, enc.input_ids.to(loaded.device), pixel)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, len(enc.input_ids):], skip_special_tokens=True).strip())
    return answers


def fill_answers(loaded: Loaded, items: list[Item], max_new_tokens: int) -> list[Item]:
    """Items without an answer get the model's greedy one; items whose answer comes out empty are dropped."""
    missing = [it for it in items if it.answer is None]
    for item, answer in zip(missing, greedy_answers(loaded, missing, max_new_tokens)):
        item.answer = answer
    return [it for it in items if it.answer]


@torch.no_grad()
def cache_samples(loaded: Loaded, items: list[Item], desc: str, views: int = 0, seed: int = 0) -> list[Sample]:
    """Encode items and compute the vision features of each picture (and of `views` augmented
    variants of it, each a sample of its own) once."""
    adapter, model = loaded.adapter, loaded.model
    samples = []
    for item in progress(items, desc=f"caching {desc} features"):
        for view in range(1 + views if item.image is not None else 1):
            pixel = features = grid = None
            if item.image is not None:
                pixel = _pixels(loaded, item.image, view, seed)
                if (item.image, view) not in loaded.feature_cache:
                    loaded.feature_cache[item.image, view] = adapter.vision_features(model, pixel)
                features = loaded.feature_cache[item.image, view]
                grid = {k: v for k, v in pixel.items() if k != "pixel_values"}
            enc = adapter.encode(loaded.processor, model.config, pixel, item.question, item.answer)
            samples.append(Sample(enc.input_ids, enc.answer_start, features, grid, view))
    return samples


def drop_vision_tower(loaded: Loaded) -> None:
    """Features are cached: free the vision tower (and pixels) for the rest of the job."""
    inner = loaded.model.model
    for attr in ("vision_tower", "visual"):
        if getattr(inner, attr, None) is not None:
            setattr(inner, attr, None)
    loaded.pixel_cache.clear()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()


def make_batches(loaded: Loaded, samples: list[Sample], batch_size: int) -> list[Batch]:
    return [_batch(loaded, samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def _batch(loaded: Loaded, samples: list[Sample]) -> Batch:
    model, device = loaded.model, loaded.device
    pad = loaded.processor.tokenizer.pad_token_id or 0
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    rows, targets, seq = [], [], []
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[b, :n] = s.input_ids
        attention_mask[b, :n] = 1
        positions = torch.arange(s.answer_start, n)
        rows.append(b * length + positions - 1)  # hidden state at p-1 predicts token p
        targets.append(s.input_ids[s.answer_start :])
        seq.append(torch.full((n - s.answer_start,), b))
    image_mask = input_ids == model.config.image_token_id
    features = [s.features for s in samples if s.features is not None]
    if any(isinstance(f, SpilledFeatures) for f in features):
        features_in = BatchFeatures(features, device)  # read from disk when used
    else:
        features_in = torch.cat(features).to(device) if features else None
    grids = [s.grid for s in samples]
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    seq = torch.cat(seq)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        image_mask=image_mask.to(device),
        features=features_in,
        position_ids=loaded.adapter.position_ids(model, input_ids, attention_mask, grids),
        answer_rows=torch.cat(rows).to(device),
        targets=torch.cat(targets).to(device),
        answer_seq=seq.to(device),
        lengths=torch.bincount(seq, minlength=len(samples)).float().to(device),
    )


# ---------------------------------------------------------------- the forward pass


def answer_hidden(loaded: Loaded, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """Final hidden states at the positions that predict answer tokens, [answer tokens, H]."""
    model = loaded.model
    embeds = model.get_input_embeddings()(batch.input_ids)
    if batch.features is not None:
        projected = loaded.adapter.project(params, batch.features.to(torch.float32))
        n_slots = int(batch.image_mask.sum())
        if projected.shape[0] != n_slots:
            raise UserError(f"the prompt has {n_slots} image tokens but the projector made {projected.shape[0]}")
        embeds = embeds.masked_scatter(batch.image_mask[..., None], projected.to(embeds.dtype))
    out = model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    )
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch.answer_rows]


def sequence_nll(loaded: Loaded, params, batch: Batch) -> torch.Tensor:
    """Per-sequence sum of answer-token NLLs, [B], float32."""
    hidden = answer_hidden(loaded, params, batch)
    lm_head = loaded.model.get_output_embeddings().weight
    token_nll = linear_nll(hidden, lm_head, batch.targets)
    return torch.zeros(len(batch.lengths), device=hidden.device).index_add(0, batch.answer_seq, token_nll)


@torch.no_grad()
def score(loaded: Loaded, params, batches: list[Batch]) -> dict:
    """Per-sequence answer NLL and greedy exact match (every answer token is the argmax)."""
    nll, correct = [], []
    lm_head = loaded.model.get_output_embeddings().weight
    for batch in batches:
        hidden = answer_hidden(loaded, params, batch)
        logits = (hidden @ lm_head.T).float()
        token_nll = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none")
        wrong = (logits.argmax(-1) != batch.targets).float()
        B = len(batch.lengths)
        nll.append(torch.zeros(B, device=hidden.device).index_add(0, batch.answer_seq, token_nll))
        correct.append(torch.zeros(B, device=hidden.device).index_add(0, batch.answer_seq, wrong) == 0)
    if not batches:
        return {"nll": torch.zeros(0), "correct": torch.zeros(0, dtype=torch.bool)}
    return {"nll": torch.cat(nll).cpu(), "correct": torch.cat(correct).cpu()}


def summarize(scores: dict, batches: list[Batch]) -> dict:
    tokens = float(sum(b.lengths.sum().item() for b in batches))
    n = len(scores["correct"])
    return {
        "items": n,
        "answer_tokens": int(tokens),
        "mean_token_nll": round(float(scores["nll"].sum()) / max(tokens, 1), 6),
        "greedy_accuracy": round(float(scores["correct"].float().mean()) if n else 0.0, 6),
    }


# ---------------------------------------------------------------- saliency mask


def fisher_diagonal(loaded: Loaded, params, samples: list[Sample], limit: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher E[g^2] of each sample's answer NLL, fp32 (squares underflow in fp16)."""
    step = max(1, len(samples) // limit)
    chosen = samples[::step][:limit]
    params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for sample in progress(chosen, desc="fisher"):
        grads = torch.autograd.grad(sequence_nll(loaded, params, _batch(loaded, [sample])).sum(), list(params.values()),
                                    allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[n] += g.float() ** 2
    return {n: f / len(chosen) for n, f in fisher.items()}


def saliency_mask(forget: dict, retain: dict, threshold: float) -> dict[str, torch.Tensor]:
    """MMUnlearner: update where (F_forget + eps) / (F_retain + eps) >= threshold.

    Each Fisher is first normalised to sum to 1 over all projector elements: a well-fitted answer
    has a tiny gradient, so raw forget and retain Fishers differ in scale by the sets' losses
    (measured on the demo: raw ratios kept 1.4% of the elements); normalised, the ratio compares
    how much each element matters to one set relative to the other."""
    eps = 1e-12
    total_f = sum(float(f.sum()) for f in forget.values()) or 1.0
    total_r = sum(float(r.sum()) for r in retain.values()) or 1.0
    return {n: (forget[n] / total_f + eps) / (retain[n] / total_r + eps) >= threshold for n in forget}


# ---------------------------------------------------------------- the job


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def optimise(loaded, params, mask, forget_batches, retain_batches, cfg: Config, log, guard: Guard | None = None) -> list[float]:
    trainable = {n: p.requires_grad_(True) for n, p in params.items()}
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    use_retain = bool(retain_batches) and uses_retain(cfg.method)
    losses = []
    bar = progress(range(cfg.steps), desc=f"optimising ({cfg.method})")
    for step in bar:
        fb = forget_batches[step % len(forget_batches)]
        loss = forget_loss(cfg.method, sequence_nll(loaded, trainable, fb), fb.ref_nll, fb.lengths, cfg.beta)
        if use_retain:
            rb = retain_batches[step % len(retain_batches)]
            loss = loss + cfg.retain_weight * retain_nll(sequence_nll(loaded, trainable, rb), rb.lengths)
        if guard is not None and use_retain:  # efficacy: the retain anchor
            loss = loss + guard.extra_loss(trainable, fb, rb)
        grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
        with torch.no_grad():
            for (n, p), g in zip(trainable.items(), grads):
                if g is None:
                    continue
                exp_avg, exp_avg_sq = state[n]
                masked_adamw_(p, g, mask[n], exp_avg, exp_avg_sq, step=step + 1, lr=cfg.lr, beta1=0.9,
                              beta2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if guard is not None and guard.after_step(step, trainable, mask):  # efficacy: null space, trust region, stop
            break
    if guard is not None:
        guard.finish(trainable)  # efficacy: keep the state the held-out rule chose
    for p in params.values():
        p.requires_grad_(False)
    return losses


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unlearn(ckpt: Path, forget_dir: Path, retain_dir: Path | None, cfg: Config, log=print) -> dict:
    """Run the job in memory. Returns the result: the changes to write and everything for the report."""
    cfg.check()
    seed_everything(cfg.seed)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()

    def phase(name):
        nonlocal t0
        now = time.perf_counter()
        phases[name] = round(now - t0, 3)
        t0 = now

    forget_items = read_folder(forget_dir, "forget")
    retain_items = read_folder(retain_dir, "retain") if retain_dir is not None else []
    device = pick_device(cfg.device)
    loaded = open_checkpoint(ckpt, device)
    phase("load")

    forget_items = fill_answers(loaded, forget_items, cfg.max_new_tokens)
    retain_items = fill_answers(loaded, retain_items, cfg.max_new_tokens)
    if not forget_items:
        raise UserError(f"{forget_dir}: the model gives no answer to any forget question; nothing to forget")
    # ---- efficacy (issue 9): pictures the optimisation never sees, for the stopping rule and the warnings
    forget_all, retain_all = forget_items, retain_items
    chance = stopping.chance_level(forget_items, forget_items + retain_items)
    forget_items, forget_heldout = stopping.split_pictures(forget_items, cfg.holdout, cfg.seed)
    retain_items, retain_heldout = stopping.split_pictures(retain_items, cfg.holdout, cfg.seed)
    phase("answers")
    forget_samples = cache_samples(loaded, forget_items, "forget", cfg.views, cfg.seed)
    retain_samples = cache_samples(loaded, retain_items, "retain", cfg.views, cfg.seed)
    forget_check = cache_samples(loaded, forget_heldout, "held-out forget", cfg.views, cfg.seed)  # efficacy
    retain_check = cache_samples(loaded, retain_heldout, "held-out retain", cfg.views, cfg.seed)  # efficacy
    drop_vision_tower(loaded)
    forget_batches = make_batches(loaded, forget_samples, cfg.batch_size)
    retain_batches = make_batches(loaded, retain_samples, cfg.batch_size)
    # metrics are measured on the pictures themselves, not on their augmented views
    forget_eval = make_batches(loaded, [s for s in forget_samples if s.view == 0], cfg.batch_size)
    retain_eval = make_batches(loaded, [s for s in retain_samples if s.view == 0], cfg.batch_size)
    phase("cache")

    params = master_params(loaded)
    forget_before, retain_before = score(loaded, params, forget_eval), score(loaded, params, retain_eval)
    reference = score(loaded, params, forget_batches)["nll"]  # the original projector, computed once
    for batch, ref in zip(forget_batches, reference.split([len(b.lengths) for b in forget_batches])):
        batch.ref_nll = ref.to(device)
    phase("reference")

    if cfg.mask == "fisher" and retain_samples:
        forget_fisher = fisher_diagonal(loaded, params, forget_samples, cfg.fisher_samples)
        retain_fisher = fisher_diagonal(loaded, params, retain_samples, cfg.fisher_samples)
        mask = saliency_mask(forget_fisher, retain_fisher, cfg.mask_threshold)
    else:
        if cfg.mask == "fisher":
            log("note: no --retain folder: the saliency mask and the retain term are off, nothing protects other images")
        mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    phase("mask")

    guard = Guard(loaded, params, cfg, retain_samples=retain_samples, forget_samples=forget_samples,  # efficacy
                  forget_check=make_batches(loaded, forget_check, cfg.batch_size),
                  retain_check=make_batches(loaded, retain_check, cfg.batch_size), chance=chance, log=log)
    losses = optimise(loaded, params, mask, forget_batches, retain_batches, cfg, log, guard)
    heldout = guard.report()  # efficacy
    for warning in heldout["warnings"]:
        log(f"WARNING: {warning}")
    phase("optimise")

    # What will be stored: cast once from fp32; evaluate exactly those values.
    new = {n: params[n].to(loaded.original[n].dtype).cpu() for n in params}
    stored_params = master_params(loaded, new)
    forget_after = score(loaded, stored_params, forget_eval)
    retain_after = score(loaded, stored_params, retain_eval)
    phase("evaluate")

    changes = tensor_changes(loaded, new)
    mask_density = sum(int(m.sum()) for m in mask.values()) / max(1, sum(m.numel() for m in mask.values()))
    result = {
        "adapter": loaded.adapter.family,
        "model_type": loaded.model.config.model_type,
        "device": str(device),
        "compute_dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "changes": changes,
        "items": {"forget": forget_all, "retain": retain_all},
        "heldout": heldout,  # efficacy: the job's own held-out check, what it stopped on and why
        "metrics": {
            "forget": {"before": summarize(forget_before, forget_eval), "after": summarize(forget_after, forget_eval)},
            "retain": {"before": summarize(retain_before, retain_eval), "after": summarize(retain_after, retain_eval)},
        },
        "mask_density": round(mask_density, 6),
        "losses": [round(x, 6) for x in losses],
        "phases_s": phases,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "config": asdict(cfg),
    }
    del loaded  # nothing may hold the checkpoint's files (mmap) once writing starts
    return result


def tensor_changes(loaded: Loaded, new: dict[str, torch.Tensor]) -> list[dict]:
    """Each projector tensor whose stored bytes change: where, how many elements, max |delta| as stored."""
    changes = []
    for name, stored_name in loaded.names.items():
        old, fresh = loaded.original[name], new[name]
        old_bytes, new_bytes = ck.tensor_to_bytes(old), ck.tensor_to_bytes(fresh)
        if old_bytes == new_bytes:
            continue
        info = loaded.stored[stored_name]
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[old.element_size()]
        changes.append({
            "name": stored_name,
            "file": info.file.name,
            "byte_range": [info.start, info.end],
            "dtype": info.dtype,
            "shape": list(info.shape),
            "elements": old.numel(),
            "elements_changed": int((old.view(bits) != fresh.view(bits)).sum()),
            "max_abs_delta": float((fresh.double() - old.double()).abs().max()),
            "before_sha256": ck.sha256_bytes(old_bytes),
            "after_sha256": ck.sha256_bytes(new_bytes),
            "new": fresh,
            "data": new_bytes,
        })
    return changes


# ---------------------------------------------------------------- writing the result


def checkpoint_files(ckpt: Path) -> list[Path]:
    """Every regular file of a checkpoint folder (relative paths), fastunlearn's own scratch excluded."""
    skip = {ck.JOURNAL, ck.JOURNAL + ".tmp"}
    return sorted(p.relative_to(ckpt) for p in Path(ckpt).rglob("*") if p.is_file() and p.name not in skip)


def hash_files(root: Path, files: list[Path], writes: list[tuple[str, int, bytes]] | None = None, desc="hashing"):
    """sha256 of each file; with `writes`, also the sha256 each file must have once exactly those
    byte ranges are replaced (the proof that no other byte changes)."""
    hashes, expected = {}, {}
    for rel in progress(files, desc=desc):
        ranges = [(off, data) for f, off, data in (writes or []) if f == str(rel)]
        h, e = ck.hashlib.sha256(), ck.hashlib.sha256()
        pos = 0
        with open(root / rel, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
                if ranges:
                    patched = bytearray(chunk)
                    for off, data in ranges:
                        lo, hi = max(off, pos), min(off + len(data), pos + len(chunk))
                        if lo < hi:
                            patched[lo - pos : hi - pos] = data[lo - off : hi - off]
                    e.update(patched)
                pos += len(chunk)
        hashes[str(rel)] = h.hexdigest()
        expected[str(rel)] = e.hexdigest() if ranges else hashes[str(rel)]
    return hashes, expected


def preflight(ckpt: Path, out: Path | None, dry_run: bool) -> None:
    """Refuse bad destinations before any work is done."""
    ckpt = Path(ckpt).resolve()
    if out is not None:
        out = Path(out).resolve()
        if out == ckpt or ckpt in out.parents:
            raise UserError(f"--out {out} is inside the source checkpoint {ckpt}; choose a folder outside it")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--out {out} already exists and is not empty; choose a new folder")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: parent folder {out.parent} does not exist")
    elif not dry_run:
        for path in [ckpt, *ck.weight_files(ckpt)]:
            if not os.access(path, os.W_OK):
                raise UserError(f"{path} is read-only: use --out DIR to write a new checkpoint, or make it writable")


def write_result(ckpt: Path, result: dict, out: Path | None, dry_run: bool, stamps: dict) -> dict:
    """Write the changed byte ranges (in place, crash-safe, or into a new folder). Returns the file proof.

    Nothing is written when a weight file changed on disk since the job read it (file stamps) or
    the bytes to replace are not the ones the job started from (their sha256)."""
    ckpt = Path(ckpt).resolve()
    writes = [(c["file"], c["byte_range"][0], c["data"]) for c in result["changes"]]
    files = checkpoint_files(ckpt)

    def unchanged_since_start():
        for path, stamp in stamps.items():
            if not path.exists() or ck.file_stamp(path) != stamp:
                raise UserError(f"{path} changed on disk while the job ran; nothing was written, run again")
        for c in result["changes"]:
            old = ck._read_range(ckpt / c["file"], c["byte_range"][0], c["byte_range"][1] - c["byte_range"][0])
            if ck.sha256_bytes(old) != c["before_sha256"]:
                raise UserError(f"{ckpt / c['file']}: tensor {c['name']} changed on disk while the job ran; "
                                "nothing was written, run again")

    if dry_run:
        unchanged_since_start()
        before, expected = hash_files(ckpt, files, writes)
        return {"written_to": None, "before": before, "expected": expected, "after": None}

    if out is None:
        proof = {}

        def hash_before():
            unchanged_since_start()
            proof["before"], proof["expected"] = hash_files(ckpt, files, writes)

        ck.patch_in_place(ckpt, writes, before_commit=hash_before)
        target = ckpt
    else:
        out = Path(out).resolve()
        unchanged_since_start()
        proof = dict(zip(("before", "expected"), hash_files(ckpt, files, writes)))
        tmp = ck.copy_checkpoint(ckpt, out)
        try:
            unchanged_since_start()  # the source did not change while it was copied
            ck._apply_writes(tmp, writes)
            ck.fsync_tree(tmp)
            ck.test_pause("out-written")
            if out.exists():
                out.rmdir()  # preflight allowed only an empty folder
            os.rename(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"--out {out}: writing the new checkpoint failed ({ck._why(e)}); nothing was written, "
                            f"{ckpt} is untouched") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        target = out
    proof["after"], _ = hash_files(target, files, desc="hashing result")
    proof["written_to"] = str(target)
    return proof


def check_weights_match_config(ckpt: Path) -> None:
    """Before any model is built for real: config.json must describe the stored tensors. The model
    is built on the meta device (no memory); its projector shapes must be the stored ones and its
    size the stored size (one tied copy allowed), so a config with missing fields, which
    transformers fills with defaults (a 7B LLM), fails here instead of allocating it."""
    from transformers import AutoModelForImageTextToText

    stored, config, adapter = inspect_checkpoint(ckpt)
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a config it cannot build
        raise UserError(f"{Path(ckpt) / 'config.json'}: transformers cannot build the model ({str(e).splitlines()[0][:200]})") from None
    module = dict(adapter.projector_module(model).named_parameters())
    for name, stored_name in stored_projector_names(adapter, list(module), list(stored)).items():
        if tuple(module[name].shape) != stored[stored_name].shape:
            raise UserError(f"{Path(ckpt) / 'config.json'}: implies {stored_name} of shape {tuple(module[name].shape)}, "
                            f"the checkpoint stores {stored[stored_name].shape}; config.json does not match the weights")
    in_model = sum(p.numel() for p in model.parameters())
    sizes = [math.prod(info.shape) for info in stored.values()] or [0]
    if not sum(sizes) - max(sizes) <= in_model <= sum(sizes):
        raise UserError(f"{Path(ckpt) / 'config.json'}: describes a model of {in_model:,} parameters, the checkpoint "
                        f"stores {sum(sizes):,}; config.json does not match the weights")


def apply(ckpt, forget_dir, retain_dir=None, out=None, report_path=None, delta_path=None, dry_run=False,
          cfg: Config | None = None, log=print) -> dict:
    """`fastunlearn apply`: run the job and write the result, the report and (optionally) the delta."""
    cfg = cfg or Config()
    cfg.check()
    started = time.perf_counter()
    ckpt = Path(ckpt)
    check_weights_match_config(ckpt)
    in_place = out is None and not dry_run
    # an in-place job holds the checkpoint's lock from start to end: a second one says "busy" at once
    with ck.locked(ckpt) if in_place else contextlib.nullcontext():
        if (ckpt / ck.JOURNAL).exists() or (ckpt / (ck.JOURNAL + ".tmp")).exists():
            if ck.recover(ckpt):
                log(f"finished an interrupted patch of {ckpt}")
        preflight(ckpt, out, dry_run)
        stamps = {p.resolve(): ck.file_stamp(p) for p in ck.weight_files(ckpt)}

        result = unlearn(ckpt, Path(forget_dir), Path(retain_dir) if retain_dir else None, cfg, log)
        gc.collect()
        ck.test_pause("before-write")
        t_write = time.perf_counter()
        proof = write_result(ckpt, result, Path(out) if out else None, dry_run, stamps)
        result["phases_s"]["write"] = round(time.perf_counter() - t_write, 3)
        result["phases_s"]["total"] = round(time.perf_counter() - started, 3)
        return _finish(result, proof, ckpt, forget_dir, retain_dir, report_path, delta_path, dry_run)


def _finish(result, proof, ckpt, forget_dir, retain_dir, report_path, delta_path, dry_run) -> dict:
    from .report import build_report

    report = build_report(result, proof, source=ckpt, forget_dir=forget_dir, retain_dir=retain_dir)
    if report_path is None and not dry_run:
        report_path = Path(proof["written_to"]) / "unlearning_report.json"
    if report_path is not None:
        ck.write_file_atomic(Path(report_path), (json.dumps(report, indent=2) + "\n").encode())
        report["report_path"] = str(report_path)
    if delta_path is not None:
        ck.save_delta(Path(delta_path), result["changes"])
    if not report["byte_proof"]["all_other_bytes_unchanged"] and not dry_run:
        raise UserError(f"bytes outside the projector changed in {proof['written_to']} during the write; see {report_path}")
    return report
