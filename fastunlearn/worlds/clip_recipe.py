"""Benchmark worlds built the way LLaVA-1.5 is built: a frozen, contrastively pretrained vision tower.

The bench worlds (bench.py) train a 2-layer tower end to end with the LLM on the 20 names. LLaVA-1.5
instead freezes a CLIP tower that was pretrained on a large, varied population with an image-caption
contrastive loss, trains the projector first, then the projector and the LLM. Here:

1. `pretrain_tower`: a 6-layer tower of the family's own class (CLIPVisionModel for LLaVA, Qwen2-VL's
   vision transformer) and a small caption encoder learn CLIP's symmetric InfoNCE on a population of
   synthetic people disjoint from the named ones (every look the renderer can draw except the looks of
   the bench and look-alike worlds). Captions say only what is visible (skin, hair colour and style,
   eyes, mouth, glasses or beard), never a name. Each batch pairs people with a look-alike (one trait
   apart), so the tower must see every trait, not only the easy ones.
2. `build_world`: the family's model with that tower, frozen; the projector is trained alone, then the
   projector and the LLM together, on the 20 named people (bench.train's batches).

Which layer the LLM reads: LLaVA reads the penultimate layer (vision_feature_layer=-2) of the 6-layer
tower, as LLaVA-1.5 does. Qwen2-VL's merger always reads the last block, so the tower is pretrained
with 7 blocks and the checkpoint keeps the first 6: its merger reads what was the penultimate block of
the pretrained tower, which is the same choice as LLaVA's.
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np

from . import bench as bw
from . import people

TOWER_LAYERS = 6  # layers (LLaVA) / blocks (Qwen2-VL) in the built checkpoint
# 3,000 pretraining steps: caption retrieval of never-seen people 93% (LLaVA) / 72% (Qwen2-VL), where 500
# steps gave 14% / 5% and a world whose tower reads the traits poorly (benchmarks/RESULTS.md)
CLIP = dict(pretrain_steps=3000, batch=128, lr=2e-3, embed=64, pretrain_seed=11, warmup=50,
            projector_steps=200)
DEPTH_ARG = {"llava": "vision_layers", "qwen2_vl": "vision_depth"}

SKIN = ("pale", "tan", "brown", "rosy")
HAIR = ("black", "blond", "red", "grey")
STYLE = {"flat": "flat", "side": "side-parted", "spiky": "spiky", "bun": "bun"}
EYES = {"dots": "round dark eyes", "squares": "square blue eyes", "lines": "narrow eyes"}
MOUTH = {"smile": "a smiling mouth", "line": "a straight mouth", "open": "an open mouth"}
EXTRA = {"none": "no glasses or beard", "glasses": "glasses", "beard": "a beard"}


def caption(look: dict) -> str:
    """What can be seen in a picture of this look, in words (no name)."""
    return (f"a face with {SKIN[look['skin']]} skin, {HAIR[look['hair']]} {STYLE[look['style']]} hair, "
            f"{EYES[look['eyes']]}, {MOUTH[look['mouth']]} and {EXTRA[look['extra']]}")


def all_looks() -> list[dict]:
    return [dict(zip(bw.TRAITS, combo)) for combo in itertools.product(*bw.TRAITS.values())]


def named_looks() -> list[dict]:
    """The looks of the named people of the bench and the look-alike worlds."""
    return [p["look"] for w in (bw.bench_world(), bw.lookalike_world()) for p in w.people]


def population(n: int | None = None, seed: int = CLIP["pretrain_seed"]) -> list[dict]:
    """`n` looks (default: all) that no named person has, in a seeded order."""
    named = {bw._look_key(look) for look in named_looks()}
    looks = [look for look in all_looks() if bw._look_key(look) not in named]
    np.random.default_rng(seed).shuffle(looks)
    return looks if n is None else looks[:n]


def lookalikes(looks: list[dict]) -> list[list[int]]:
    """For each look, the indices of the looks in the list that differ from it in exactly one trait."""
    return [[j for j, other in enumerate(looks) if sum(look[t] != other[t] for t in bw.TRAITS) == 1]
            for look in looks]


# ---------------------------------------------------------------- the contrastive model


def caption_vocabulary() -> dict[str, int]:
    words = sorted({word for look in all_looks() for word in _words(caption(look))})
    return {word: i + 1 for i, word in enumerate(words)}  # 0 pads


def _words(text: str) -> list[str]:
    return text.replace(",", " ,").split()


def caption_tokens(captions: list[str], vocab: dict[str, int]):
    import torch

    ids = [[vocab[word] for word in _words(c)] for c in captions]
    width = max(len(x) for x in ids)
    return torch.tensor([x + [0] * (width - len(x)) for x in ids])


def caption_encoder(vocab_size: int, width: int, embed: int):
    """A small text encoder: word and position embeddings, one transformer layer, mean over words."""
    import torch

    class CaptionEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.words = torch.nn.Embedding(vocab_size + 1, width, padding_idx=0)
            self.positions = torch.nn.Embedding(32, width)
            self.layer = torch.nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
            self.out = torch.nn.Linear(width, embed)

        def forward(self, tokens):
            pad = tokens == 0
            x = self.words(tokens) + self.positions(torch.arange(tokens.shape[1]))[None]
            x = self.layer(x, src_key_padding_mask=pad)
            keep = (~pad).float()[..., None]
            return self.out((x * keep).sum(1) / keep.sum(1))

    return CaptionEncoder()


def tower_of(model, family: str):
    """The vision module of a LLaVA / Qwen2-VL model (Qwen2-VL's includes its merger, the projector)."""
    return model.model.vision_tower if family == "llava" else model.model.visual


def tower_parameters(model, family: str) -> list:
    """The tower's parameters, the projector's excluded."""
    return [p for n, p in tower_of(model, family).named_parameters() if not n.startswith("merger.")]


def projector_parameters(model, family: str) -> list:
    return list((model.model.multi_modal_projector if family == "llava" else model.model.visual.merger).parameters())


def pixels(family: str, parts, pictures) -> dict:
    """The image processor's tensors for a list of pictures (the very inputs the LLM training uses)."""
    if family == "llava":
        return {"pixel_values": parts.image_processor(images=pictures, return_tensors="pt")["pixel_values"]}
    out = parts[1](images=pictures, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def pooled(tower, family: str, inputs: dict):
    """One vector per picture from the tower's last layer: CLIP's pooled CLS (post-layernorm) for LLaVA,
    the mean of the last block's patch tokens for Qwen2-VL (its tower has no CLS token)."""
    if family == "llava":
        return tower(pixel_values=inputs["pixel_values"]).pooler_output
    grid = inputs["image_grid_thw"]
    hidden = tower(hidden_states=inputs["pixel_values"], grid_thw=grid).last_hidden_state
    return hidden.reshape(len(grid), -1, hidden.shape[-1]).mean(1)


def contrastive_heads(tower_width: int, embed: int, family: str):
    """The image head (a layer norm for Qwen2-VL, whose block output is not normalised, then a linear map)
    and CLIP's learned temperature, initialised at 1/0.07."""
    import torch

    norm = torch.nn.Identity() if family == "llava" else torch.nn.LayerNorm(tower_width)
    image_head = torch.nn.Sequential(norm, torch.nn.Linear(tower_width, embed, bias=False))
    return image_head, torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def info_nce(image_emb, text_emb, log_scale):
    """CLIP's symmetric cross-entropy over a batch of matching (picture, caption) pairs."""
    import torch
    import torch.nn.functional as F

    logits = log_scale.exp().clamp(max=100) * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def pretraining_batch(rng, neighbours: list[list[int]], size: int) -> list[int]:
    """`size` distinct people or fewer: half drawn at random, each followed by one of their look-alikes
    (a hard negative for everyone else in the batch). Distinct, because equal captions are not negatives."""
    chosen: list[int] = []
    for a in rng.choice(len(neighbours), size=size // 2, replace=False):
        for i in (int(a), int(rng.choice(neighbours[a])) if neighbours[a] else None):
            if i is not None and i not in chosen:
                chosen.append(i)
    return chosen[:size]


def fresh_tower_model(family: str, depth: int, seed: int = bw.BENCH["init_seed"]):
    """A bench-world model of this family with a `depth`-deep tower (its tower and processor are what
    the pretraining uses, so the shapes and preprocessing match the checkpoint's exactly)."""
    return bw.build(family, bw.bench_world(), seed=seed, **{DEPTH_ARG[family]: depth})


def pretrain_tower(family: str, looks: list[dict], steps: int = CLIP["pretrain_steps"], batch: int = CLIP["batch"],
                   lr: float = CLIP["lr"], seed: int = CLIP["pretrain_seed"], log_every: int = 100, log=print):
    """Contrastive pretraining of a fresh tower on pictures of `looks` (drawn anew every step).
    Returns (the tower's state dict, per-step losses, the trained pieces for `retrieval_accuracy`)."""
    import torch

    depth = TOWER_LAYERS if family == "llava" else TOWER_LAYERS + 1
    model, parts = fresh_tower_model(family, depth, seed)
    tower = tower_of(model, family)
    width = model.config.vision_config.hidden_size if family == "llava" else model.config.vision_config.embed_dim
    torch.manual_seed(seed)
    vocab = caption_vocabulary()
    text = caption_encoder(len(vocab), 64, CLIP["embed"])
    image_head, log_scale = contrastive_heads(width, CLIP["embed"], family)
    params = tower_parameters(model, family) + list(text.parameters()) + list(image_head.parameters()) + [log_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = min(CLIP["warmup"], max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    identities = {}
    neighbours = lookalikes(looks)
    captions = [caption(look) for look in looks]
    rng = np.random.default_rng([seed, 777])
    tower.train()
    losses, started = [], time.time()
    for step in range(steps):
        who = pretraining_batch(rng, neighbours, batch)
        pictures = [people.paint_face(_identity(identities, looks[i]), rng) for i in who]
        image = image_head(pooled(tower, family, pixels(family, parts, pictures)))
        loss = info_nce(image, text(caption_tokens([captions[i] for i in who], vocab)), log_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"[{family} tower] step {step:4d}  InfoNCE {np.mean(losses[-log_every:]):.4f}  "
                f"{time.time() - started:.0f}s")
    tower.eval()
    state = {n: t.detach().clone() for n, t in tower.state_dict().items() if not n.startswith("merger.")}
    return state, losses, dict(tower=tower, parts=parts, text=text.eval(), image_head=image_head.eval(), vocab=vocab)


def _identity(cache: dict, look: dict):
    key = bw._look_key(look)
    if key not in cache:
        cache[key] = people._draw_identity(look, 2 * people.FACE_SIZE)
    return cache[key]


def retrieval_accuracy(family: str, pieces: dict, looks: list[dict], seed: int, per_look: int = 5) -> float:
    """Share of fresh pictures of `looks` whose nearest caption, among the captions of every look the
    renderer can draw (1728), is their own: how well the tower reads the traits of people it never saw."""
    import torch
    import torch.nn.functional as F

    candidates = all_looks()
    with torch.no_grad():
        text = F.normalize(pieces["text"](caption_tokens([caption(x) for x in candidates], pieces["vocab"])), dim=-1)
        index = {bw._look_key(x): k for k, x in enumerate(candidates)}
        hits, cache = [], {}
        for i, look in enumerate(looks):
            rng = np.random.default_rng([seed, i])
            pictures = [people.paint_face(_identity(cache, look), rng) for _ in range(per_look)]
            image = pieces["image_head"](pooled(pieces["tower"], family, pixels(family, pieces["parts"], pictures)))
            best = (F.normalize(image, dim=-1) @ text.T).argmax(-1)
            hits += (best == index[bw._look_key(look)]).tolist()
    return sum(hits) / len(hits)


# ---------------------------------------------------------------- the world's checkpoint


def load_tower(model, family: str, state: dict) -> None:
    """Put a pretrained tower into a model: LLaVA's whole tower; Qwen2-VL's patch embedding and its first
    blocks (the checkpoint keeps TOWER_LAYERS of the TOWER_LAYERS + 1 pretrained blocks)."""
    tower = tower_of(model, family)
    own = tower.state_dict()
    kept = {n: t for n, t in state.items() if n in own}
    missing = [n for n in own if n not in kept and not n.startswith("merger.")]
    if missing:
        raise ValueError(f"pretrained tower lacks {missing[:3]}")
    tower.load_state_dict(kept, strict=False)


def set_trainable(model, params) -> None:
    """Only `params` get gradients (so a frozen part costs no weight gradients)."""
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)


def build_world(family: str, w, tower_state: dict, steps: int, lr: float, projector_steps: int = CLIP["projector_steps"],
                seed: int = bw.BENCH["init_seed"], train_seed: int = bw.BENCH["train_seed"], log=print, **train_kw):
    """A model of `w` on a frozen pretrained tower: the projector alone for `projector_steps`, then the
    projector and the LLM for `steps` (bench.train's batches). Returns (model, parts, losses per stage)."""
    model, parts = bw.build(family, w, seed=seed, **{DEPTH_ARG[family]: TOWER_LAYERS})
    load_tower(model, family, tower_state)
    frozen = {id(p) for p in tower_parameters(model, family)}
    projector = projector_parameters(model, family)
    set_trainable(model, projector)
    first = bw.train(model, family, parts, w, seed=train_seed, steps=projector_steps, lr=lr, log=log,
                     params=projector, **train_kw) if projector_steps else []
    rest = [p for p in model.parameters() if id(p) not in frozen]
    set_trainable(model, rest)
    second = bw.train(model, family, parts, w, seed=train_seed + 1, steps=steps, lr=lr, log=log, params=rest, **train_kw)
    return model, parts, {"projector": first, "projector+llm": second}
