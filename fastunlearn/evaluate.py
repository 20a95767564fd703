"""Forgetting metrics: does the model still recognise the forgotten people, and what else changed?

Every metric is a plain function of an opened checkpoint (`unlearn.Loaded`) and a set of projector
parameters, so the same code scores the original, a fastunlearn result held in memory, or any other
method's result (a whole-model method loads its LLM weights into `loaded.model` first).

- exact answer: the answer is the greedy continuation, token for token (teacher-forced argmax);
- multiple choice: the answer has the lowest NLL among `options` (the true answer and distractors
  drawn from the other answers to the same question); chance is 1 / number of options;
- generation: greedy decoding of up to `max_new_tokens` tokens; counts outputs that contain the
  answer anywhere (case-insensitive);
- relearning: steps of projector fine-tuning on the forget pictures until the forgotten answers
  come back on held-out pictures;
- linear probe: a logistic regression on the projected visual tokens, trained on the job's
  pictures of everyone, tested on held-out pictures: is the identity still linearly readable?

Pictures are prepared (vision features cached) once with `prepare` while the vision tower is loaded.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import safetensors_io as st
from .batches import Batch, make_batches
from .data import Item
from .errors import UserError
from .features import Sample, cache_samples
from .forward import answer_hidden, score, sequence_nll
from .load import Loaded
from .scope import TOWER


@dataclass
class Question:
    image: object  # Path or None (text-only)
    question: str
    answer: str
    options: list[str]  # the answer and its distractors, in a fixed shuffled order
    subject: str


def with_options(items: list[Item], pool: list[Item] | None = None, k: int = 4, seed: int = 0,
                 kind=lambda item: item.question) -> list[Question]:
    """Multiple-choice questions: each item's answer plus up to k-1 other answers that `pool` (default:
    the items themselves) gives to questions of the same kind (default: the same question), chosen and
    ordered deterministically from the picture's content (not its path: a copy of a folder elsewhere gets
    the same options), the question and the answer."""
    answers_by_question: dict[str, list[str]] = {}
    for it in (pool if pool is not None else items):
        options = answers_by_question.setdefault(kind(it), [])
        if it.answer and it.answer not in options:
            options.append(it.answer)
    questions, digests = [], {}
    for it in items:
        if not it.answer:
            raise UserError("multiple choice needs an answer for every item")
        if it.image not in digests:
            digests[it.image] = picture_digest(it.image)
        key = f"{seed}:{digests[it.image]}:{it.question}:{it.answer}".encode()
        rng = random.Random(hashlib.sha256(key).digest())
        others = sorted(a for a in answers_by_question.get(kind(it), []) if a != it.answer)
        options = rng.sample(others, min(k - 1, len(others))) + [it.answer]
        rng.shuffle(options)
        questions.append(Question(it.image, it.question, it.answer, options, it.subject))
    return questions


def picture_digest(image) -> str:
    """The sha256 of a picture's bytes ("" for a text-only item; the path where it cannot be read: loading
    it later says why)."""
    if image is None:
        return ""
    try:
        return st.sha256_file(Path(image))
    except OSError:
        return str(image)


def contains_answer(output: str, answer: str) -> bool:
    """Does a generated text contain the answer anywhere (case-insensitive)?"""
    return answer.strip().lower() in output.lower()


def chosen_options(option_nll: list[torch.Tensor]) -> list[int]:
    """Index of the most likely option (lowest NLL) of each question; ties go to the first."""
    return [int(torch.argmin(n)) for n in option_nll]


# ---------------------------------------------------------------- a prepared question set


@dataclass
class Prepared:
    questions: list[Question]
    answer_batches: list[Batch]  # question + true answer
    option_batches: list[Batch]  # question + each option, questions in order
    prompts: list[Sample]  # question only, for generation
    batch_size: int


@torch.no_grad()
def prepare(loaded: Loaded, questions: list[Question], batch_size: int = 32) -> Prepared:
    """Encode the questions and cache their pictures' vision features (the tower must still be loaded)."""
    def items(answer_of):
        return [Item(q.image, q.question, a, q.subject) for q in questions for a in answer_of(q)]

    answers = cache_samples(loaded, items(lambda q: [q.answer]), "eval")
    options = cache_samples(loaded, items(lambda q: q.options), "options")
    prompts = cache_samples(loaded, items(lambda q: [None]), "prompts")
    return Prepared(questions, make_batches(loaded, answers, batch_size), make_batches(loaded, options, batch_size),
                    prompts, batch_size)


@torch.no_grad()
def greedy_generate(loaded: Loaded, params, prompts: list[Sample], max_new_tokens: int = 16,
                    batch_size: int = 32) -> list[str]:
    """Greedy decoding with the given projector parameters, on cached features (no vision tower, no
    KV cache: the sequences are short). Stops at the end token."""
    tokenizer = loaded.processor.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    lm_head = loaded.model.get_output_embeddings().weight
    image_token = loaded.model.config.image_token_id
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generated: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new_tokens):
            # one dummy token after the sequence: its "answer row" is the next-token prediction
            samples = [Sample(torch.cat([s.input_ids, torch.tensor(g + [pad], dtype=torch.long)]),
                              len(s.input_ids) + len(g), s.features, s.grid) for s, g in zip(chunk, generated)]
            batch = make_batches(loaded, samples, len(samples))[0]
            next_ids = (answer_hidden(loaded, params, batch) @ lm_head.T).argmax(-1).tolist()
            for b, token in enumerate(next_ids):
                if done[b]:
                    continue
                if token in (eos, image_token):  # an image placeholder cannot be fed back without a picture
                    done[b] = True
                else:
                    generated[b].append(token)
            if all(done):
                break
        texts += [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]
    return texts


@torch.no_grad()
def evaluate_set(loaded: Loaded, params, prepared: Prepared, max_new_tokens: int = 16) -> dict:
    """Exact answer, multiple choice, generation containment and answer NLL of one prepared set."""
    questions = prepared.questions
    if not questions:
        return {"items": 0}
    exact = score(loaded, params, prepared.answer_batches)
    option_nll = score(loaded, params, prepared.option_batches)["nll"].split([len(q.options) for q in questions])
    chosen = chosen_options(list(option_nll))
    mc_correct = [q.options[c] == q.answer for q, c in zip(questions, chosen)]
    outputs = greedy_generate(loaded, params, prepared.prompts, max_new_tokens, prepared.batch_size)
    contained = [contains_answer(o, q.answer) for o, q in zip(outputs, questions)]
    tokens = float(sum(b.lengths.sum().item() for b in prepared.answer_batches))
    n = len(questions)
    return {
        "items": n,
        "exact_accuracy": round(float(exact["correct"].float().mean()), 6),
        "exact_correct": [int(c) for c in exact["correct"]],  # per item: pairs before and after for the drop's interval
        "mc_accuracy": round(sum(mc_correct) / n, 6),
        "mc_chance": round(sum(1 / len(q.options) for q in questions) / n, 6),
        "generation_contains_answer": round(sum(contained) / n, 6),
        "mean_token_nll": round(float(exact["nll"].sum()) / max(tokens, 1.0), 6),
        "answer_nll": [round(float(x), 6) for x in exact["nll"]],  # per item, to prove "unchanged"
    }


def max_nll_change(before: dict, after: dict) -> float:
    """Largest per-item change of answer NLL between two evaluations of the same set (0.0: identical)."""
    a, b = before.get("answer_nll", []), after.get("answer_nll", [])
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


# ---------------------------------------------------------------- robustness probes


def relearn_steps(loaded: Loaded, params, train: list[Sample], heldout: list[Batch], target: float = 0.9,
                  max_steps: int = 40, check_every: int = 2, lr: float = 1e-3, batch_size: int = 16,
                  seed: int = 0) -> dict:
    """Fine-tune the projector (Adam, answer NLL) on `train` until the exact-answer accuracy on `heldout`
    reaches `target`, checked every `check_every` steps. Returns {"steps": n or None (not within max_steps),
    "curve": [(step, accuracy)]} and the settings (target, max_steps, lr, check_every). Edited tower
    layers in `params` (scope.TOWER keys) stay as given: the attack is the same whatever the job's scope."""
    torch.manual_seed(seed)
    trainable = {n: p.detach().clone().requires_grad_(not n.startswith(TOWER)) for n, p in params.items()}
    optimizer = torch.optim.Adam([p for p in trainable.values() if p.requires_grad], lr=lr)
    batches = make_batches(loaded, train, batch_size)
    if not batches or not heldout:
        raise UserError("relearning needs forget pictures to train on and held-out pictures to test on")

    def accuracy():
        frozen = {n: p.detach() for n, p in trainable.items()}
        return float(score(loaded, frozen, heldout)["correct"].float().mean())

    settings = {"target": target, "max_steps": max_steps, "lr": lr, "check_every": check_every}
    curve = [(0, round(accuracy(), 4))]
    if curve[0][1] >= target:
        return {"steps": 0, **settings, "curve": curve}
    for step in range(1, max_steps + 1):
        batch = batches[(step - 1) % len(batches)]
        loss = sequence_nll(loaded, trainable, batch).sum() / batch.lengths.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % check_every == 0:
            curve.append((step, round(accuracy(), 4)))
            if curve[-1][1] >= target:
                return {"steps": step, **settings, "curve": curve}
    return {"steps": None, **settings, "curve": curve}


@torch.no_grad()
def projected_tokens(loaded: Loaded, params, samples: list[Sample]) -> torch.Tensor:
    """The projector's output for each sample's picture, flattened: [samples, tokens * hidden]."""
    return torch.stack([loaded.adapter.project_images(loaded.model, params, [s.features.to(loaded.device, torch.float32)],
                                                      [s.grid])[0].flatten().cpu() for s in samples])


def fresh_projector(params: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A never-trained projector of the same shapes: nn.Linear's default uniform initialisation for
    weights and biases, ones and zeros for a norm's weight and bias (names containing "ln")."""
    generator = torch.Generator().manual_seed(seed)
    weights = {n: p for n, p in params.items() if p.dim() == 2}
    fresh = {}
    for name, p in params.items():
        if "ln" in name.split(".")[0]:
            fresh[name] = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            continue
        fan_in = p.shape[1] if p.dim() == 2 else weights[name.rsplit(".", 1)[0] + ".weight"].shape[1]
        bound = fan_in ** -0.5
        fresh[name] = (torch.rand(p.shape, generator=generator) * 2 - 1).mul_(bound).to(p.device, p.dtype)
    return fresh


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, classes: int,
                 steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """Multinomial logistic regression (standardised inputs, full-batch Adam); predicted class of each test row."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, t = (train_x - mean) / std, (test_x - mean) / std
    weight = (torch.randn(x.shape[1], classes, generator=generator) * 0.01).requires_grad_(True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, train_y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (t @ weight + bias).argmax(-1)


def identity_probe(loaded: Loaded, params, train: list[Sample], train_subjects: list[str], test: list[Sample],
                   test_subjects: list[str], forgotten: set[str], seed: int = 0) -> dict:
    """Linear probe for identity on projected visual tokens: accuracy on held-out pictures of the
    forgotten subjects and of the others (chance: 1 / number of subjects)."""
    names = sorted(set(train_subjects))
    if len(names) < 2:
        raise UserError("the identity probe needs pictures of at least two subjects")
    label = {s: i for i, s in enumerate(names)}
    keep = [i for i, s in enumerate(test_subjects) if s in label]
    predicted = linear_probe(projected_tokens(loaded, params, train), torch.tensor([label[s] for s in train_subjects]),
                             projected_tokens(loaded, params, [test[i] for i in keep]), len(names), seed=seed)
    hits = {"forgotten": [], "others": []}
    for p, i in zip(predicted.tolist(), keep):
        hits["forgotten" if test_subjects[i] in forgotten else "others"].append(p == label[test_subjects[i]])
    return {
        "classes": len(names),
        "chance": round(1 / len(names), 6),
        "forgotten_accuracy": round(sum(hits["forgotten"]) / max(1, len(hits["forgotten"])), 6),
        "others_accuracy": round(sum(hits["others"]) / max(1, len(hits["others"])), 6),
        "test_items": {k: len(v) for k, v in hits.items()},
    }
