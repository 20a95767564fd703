"""Tiny but real Hugging Face checkpoints that know a synthetic people world.

A LLaVA-1.5-style model and a Qwen2-VL model, their tokenizers (a byte-level BPE trained on the
world's texts) and processors, training from pictures and text facts, evaluation, save and load.
Both answer "Who is in this image?" from a picture and "What is the job of <Name>?" / "Where does
<Name> live?" from text alone. Everything is deterministic from seeds; `scripts/build_demo.py`
trains and saves the demo pair.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from .people import PEOPLE, VISUAL_QUESTION, all_text_facts, draw_face
from .tokenizers import (FAMILIES, LLAVA_CHAT_TEMPLATE, LLAVA_SPECIALS, QWEN_CHAT_TEMPLATE,  # noqa: F401 (re-exported)
                         QWEN_SPECIALS, build_tokenizer)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

LLAVA_IMAGE_SIZE = 32     # CLIP 32x32, patch 8 -> 16 image tokens
QWEN_IMAGE_SIZE = 56      # 56x56, patch 14, merge 2 -> grid 1x4x4 -> 4 image tokens


def build_llava(seed: int = 0, text_hidden: int = 64, text_layers: int = 2,
                vision_hidden: int = 64, vision_layers: int = 2, tok=None):
    """A tiny randomly initialised LLaVA-1.5-style model and its LlavaProcessor."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = build_tokenizer("llava") if tok is None else tok
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        do_convert_rgb=True, resample=3)  # bicubic; CLIP's default mean/std
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=2,
                              image_size=LLAVA_IMAGE_SIZE, patch_size=8, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=text_hidden,
                       intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _set_generation_ids(model, tok)
    return model, processor


def build_qwen2vl(seed: int = 0, text_hidden: int = 64, text_layers: int = 2,
                  vision_embed: int = 64, vision_depth: int = 2, image_size: int = QWEN_IMAGE_SIZE, tok=None):
    """A tiny randomly initialised Qwen2-VL model with (tokenizer, image_processor).

    No Qwen2VLProcessor: its video processor needs torchvision. Prompts are
    encoded by `encode` below (the image pad expanded to grid_thw.prod()//4).
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer("qwen2_vl") if tok is None else tok
    n = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": n, "longest_edge": n}, patch_size=14, merge_size=2,
        temporal_patch_size=2)
    heads = 4
    head_dim = text_hidden // heads
    quarter = head_dim // 2 // 4  # mrope sections (t, h, w) sum to head_dim / 2
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in QWEN_SPECIALS.items()}
    config = Qwen2VLConfig(
        vision_config=dict(depth=vision_depth, embed_dim=vision_embed, hidden_size=text_hidden,
                           num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        text_config=dict(vocab_size=len(tok), hidden_size=text_hidden,
                         intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2 * quarter, quarter, quarter]},
                         bos_token_id=ids["im_start"], eos_token_id=ids["eos"],
                         pad_token_id=ids["pad"], tie_word_embeddings=False),
        image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        bos_token_id=ids["im_start"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    _set_generation_ids(model, tok)
    return model, (tok, image_processor)


def _set_generation_ids(model, tok):
    g = model.generation_config
    g.eos_token_id = tok.eos_token_id
    g.pad_token_id = tok.pad_token_id
    g.bos_token_id = tok.bos_token_id
    g.do_sample = False


def tokenizer_of(family: str, parts):
    return parts.tokenizer if family == "llava" else parts[0]


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------

def prompt_text(family: str, parts, question: str, with_image: bool) -> str:
    """The chat-template prompt (generation prompt included) for one question."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    tok = tokenizer_of(family, parts)
    return tok.apply_chat_template([{"role": "user", "content": content}],
                                   add_generation_prompt=True, tokenize=False)


def answer_text(family: str, answer: str) -> str:
    """What the model is trained to write after the prompt (end token included)."""
    if family == "llava":
        return " " + answer + LLAVA_SPECIALS["eos"]
    return answer + QWEN_SPECIALS["eos"]


def encode(family: str, parts, examples, with_labels: bool = True) -> dict:
    """Batch-encode examples [(image_or_None, question, answer_or_None)] for `model(**batch)`.

    Prompts come from the chat template; with labels, the answer and its end
    token are appended and labels are -100 everywhere else (prompt, image
    tokens, padding). Left padding, so the same batch also serves `generate`.
    """
    import torch

    tok = tokenizer_of(family, parts)
    images = [im for im, _, _ in examples if im is not None]
    pixel = {}
    if family == "llava":
        image_token = LLAVA_SPECIALS["image"]
        if images:
            pixel = dict(parts.image_processor(images=images, return_tensors="pt"))
        # one token per 8x8 patch: + 1 for CLS, - 1 as "default" drops it
        n_tokens = [(LLAVA_IMAGE_SIZE // 8) ** 2] * len(images)
    else:
        image_token = QWEN_SPECIALS["image"]
        if images:
            pixel = dict(parts[1](images=images, return_tensors="pt"))
        # one token per 2x2 block of 14x14 patches
        n_tokens = [int(g.prod()) // 4 for g in pixel["image_grid_thw"]] if images else []
    n_tokens = iter(n_tokens)
    seqs, labels = [], []
    for im, q, a in examples:
        text = prompt_text(family, parts, q, im is not None)
        if im is not None:
            text = text.replace(image_token, image_token * next(n_tokens), 1)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        lab = [-100] * len(ids)
        if with_labels and a is not None:
            ans = tok(answer_text(family, a), add_special_tokens=False)["input_ids"]
            ids, lab = ids + ans, lab + ans
        seqs.append(ids)
        labels.append(lab)
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    batch = dict(input_ids=input_ids, attention_mask=attention, **pixel)
    if family == "qwen2_vl":
        batch["mm_token_type_ids"] = (input_ids == tok.convert_tokens_to_ids(image_token)).int()
    if with_labels:
        batch["labels"] = torch.tensor([[-100] * (width - len(l)) + l for l in labels])
    return batch


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------

def train(model, family: str, parts, seed: int = 0, steps: int = 600, lr: float = 3e-3,
          n_visual: int = 32, weight_decay: float = 0.01, warmup: int = 30, log_every: int = 100,
          log=print, visual_batch=None, facts=None, params=None) -> list[float]:
    """Full-parameter AdamW training on the world.

    Every step: `n_visual` freshly drawn pictures ("Who is in this image?" ->
    name, people drawn at random) plus every text-only fact (job, city) of all
    people, in one left-padded batch; loss on answer tokens and the end token
    only. Linear warm-up then cosine decay. Returns the loss per step.
    Another world passes `visual_batch(rng, n) -> [(picture, question, answer)]` and its `facts`.
    `params`: the parameters to update (default: all of the model's); the others stay as they are.
    """
    import torch

    torch.manual_seed(seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(model, family, parts, seed, steps, lr, n_visual, weight_decay, warmup,
                      log_every, log, visual_batch or _visual_batch,
                      facts if facts is not None else [(None, q, a) for _, q, a in all_text_facts()],
                      list(model.parameters()) if params is None else list(params))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _visual_batch(rng, n: int) -> list:
    """n fresh pictures of people drawn at random, each asked who it is."""
    who = rng.integers(0, len(PEOPLE), size=n)
    return [(draw_face(int(i), rng), VISUAL_QUESTION, PEOPLE[int(i)]["name"]) for i in who]


def _train(model, family, parts, seed, steps, lr, n_visual, weight_decay, warmup, log_every, log,
           visual_batch, facts, params):
    import torch

    rng = np.random.default_rng([seed, 12345])  # a stream write_folder never uses
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                            betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    t0 = time.time()
    for step in range(steps):
        batch = encode(family, parts, visual_batch(rng, n_visual) + facts)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"[{family}] step {step:4d}  loss {np.mean(losses[-log_every:]):.4f}  "
                f"{time.time() - t0:.0f}s")
    model.eval()
    return losses


def generate_answers(model, family: str, parts, examples, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to [(image_or_None, question)], decoded without special tokens."""
    import torch

    batch = encode(family, parts, [(im, q, None) for im, q in examples], with_labels=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    tok = tokenizer_of(family, parts)
    new = out[:, batch["input_ids"].shape[1]:]
    return [tok.decode(row, skip_special_tokens=True).strip() for row in new]


def greedy_answer(model, family: str, parts, image, question: str, max_new_tokens: int = 8) -> str:
    """The model's greedy answer to one question, with a picture or without (image=None).

    `parts` is the LlavaProcessor for "llava", (tokenizer, image_processor) for "qwen2_vl".
    """
    return generate_answers(model, family, parts, [(image, question)], max_new_tokens)[0]


def is_correct(answer: str, expected: str) -> bool:
    """Exact match at the start of the decoded answer."""
    return answer.strip().startswith(expected)


def evaluate(model, family: str, parts, seed: int, n_per_person: int = 20,
             people_indices=None) -> dict:
    """Held-out accuracy: visual per person on `n_per_person` fresh pictures drawn with
    `seed` (as `write_folder` would draw them), and on every text fact."""
    idx = list(range(len(PEOPLE))) if people_indices is None else list(people_indices)
    visual = {}
    for i in idx:
        rng = np.random.default_rng([seed, i])
        pics = [draw_face(i, rng) for _ in range(n_per_person)]
        answers = generate_answers(model, family, parts, [(p, VISUAL_QUESTION) for p in pics])
        visual[PEOPLE[i]["name"]] = sum(is_correct(a, PEOPLE[i]["name"]) for a in answers) / len(pics)
    facts = all_text_facts(idx)
    answers = generate_answers(model, family, parts, [(None, q) for _, q, _ in facts])
    text = {}
    for (i, q, a), got in zip(facts, answers):
        text.setdefault(PEOPLE[i]["name"], []).append(is_correct(got, a))
    text = {k: sum(v) / len(v) for k, v in text.items()}
    return dict(visual=visual, text=text)


# ---------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------

def save(model, family: str, parts, out_dir) -> str:
    """save_pretrained the model (fp32 safetensors) and its processor files. Returns the first 16 hex digits
    of the weights file's sha256, to tell whether two builds made the same world."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if family == "llava":
        parts.save_pretrained(out_dir)
    else:
        parts[0].save_pretrained(out_dir)
        parts[1].save_pretrained(out_dir)
    for f in out_dir.iterdir():
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600
    from ..safetensors_io import sha256_file

    return sha256_file(out_dir / "model.safetensors")[:16]


def load(ckpt_dir, family: str | None = None):
    """Load a saved checkpoint: (model, parts), family read from config.json if not given."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    ckpt_dir = Path(ckpt_dir)
    if family is None:
        family = json.loads((ckpt_dir / "config.json").read_text())["model_type"]
    model = AutoModelForImageTextToText.from_pretrained(ckpt_dir).eval()
    if family == "llava":
        parts = AutoProcessor.from_pretrained(ckpt_dir)
    else:
        parts = (AutoTokenizer.from_pretrained(ckpt_dir), AutoImageProcessor.from_pretrained(ckpt_dir))
    return model, parts
