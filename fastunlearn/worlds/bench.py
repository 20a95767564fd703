"""The evaluation benchmark world: the demo's synthetic people, scaled to 20 people (so 5%, 10% and
20% of them are 1, 2 and 4 people), in the spirit of MLLMU-Bench.

Per person: a cartoon face (drawn by fastunlearn.world under random shift, lighting and noise),
two visual questions about a picture ("Who is in this image?" -> name, "What is the job of the
person in this image?" -> job) and two text-only questions ("What is the job of <Name>?",
"Where does <Name> live?"). Multiple-choice options come from fastunlearn.evaluate.with_options.

`scripts/build_bench_world.py` trains a small LLaVA and a small Qwen2-VL on it with fixed seeds,
reusing training.py's builders, tokenizer and encoder and people.py's drawing code. `World` is the common view of
this world and of the 8-person demo world that benchmarks/compare.py uses.
"""
from __future__ import annotations

import functools
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import Item
from . import people as world
from . import training

FIRST = ["Ada", "Bela", "Cyrus", "Dora", "Elif", "Felix", "Gita", "Hanno", "Ines", "Jonas",
         "Kira", "Lior", "Mina", "Nils", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tove"]
LAST = ["Abbott", "Brandt", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvat", "Ito", "Jansen",
        "Kowalski", "Lindqvist", "Mendes", "Nakamura", "Olsen", "Petrov", "Quist", "Rossi", "Sato", "Tiwari"]
JOBS = ["baker", "pilot", "nurse", "farmer", "dentist", "plumber", "teacher", "chef", "lawyer", "painter",
        "librarian", "carpenter", "florist", "jeweller", "surgeon", "tailor", "barber", "poet", "judge", "sailor"]
CITIES = ["Lyon", "Osaka", "Oslo", "Lima", "Madrid", "Beirut", "Prague", "Lisbon", "Quito", "Dakar",
          "Hanoi", "Perth", "Vienna", "Cairo", "Seoul", "Tunis", "Bergen", "Porto", "Delhi", "Riga"]
TRAITS = dict(skin=range(len(world.SKIN)), hair=range(len(world.HAIR)), style=("flat", "side", "spiky", "bun"),
              eyes=("dots", "squares", "lines"), mouth=("smile", "line", "open"), extra=("none", "glasses", "beard"))
VISUAL_QUESTIONS = (("Who is in this image?", "name"), ("What is the job of the person in this image?", "job"))
TEXT_QUESTIONS = (("What is the job of {name}?", "job"), ("Where does {name} live?", "city"))
BENCH = dict(people=20, looks_seed=7, init_seed=0, train_seed=1, eval_seed=1001, n_visual=32, threads=1,
             steps={"llava": 1500, "qwen2_vl": 2000}, lr={"llava": 3e-3, "qwen2_vl": 5e-3}, vocab_size=768,
             # the look-alike world (twins differ in one trait): Qwen2-VL needs 3000 steps to name 96% of
             # held-out pictures (1000 gave 42%); LLaVA's, as measured in RESULTS.md, had 1000 (82%)
             lookalike_steps={"llava": 1000, "qwen2_vl": 3000})


def distinct_looks(n: int, seed: int, min_differences: int = 3) -> list[dict]:
    """n looks, any two differing in at least `min_differences` of the six traits (seeded greedy pick)."""
    candidates = [dict(zip(TRAITS, combo)) for combo in itertools.product(*TRAITS.values())]
    random.Random(seed).shuffle(candidates)
    chosen = []
    for look in candidates:
        if all(sum(look[k] != other[k] for k in TRAITS) >= min_differences for other in chosen):
            chosen.append(look)
            if len(chosen) == n:
                return chosen
    raise ValueError(f"cannot find {n} looks that differ in {min_differences} traits")


@dataclass(frozen=True)
class World:
    """People (name, job, city, look) and the questions asked about them."""

    people: tuple[dict, ...]
    visual_questions: tuple[tuple[str, str], ...]  # (question, which field answers it)
    text_questions: tuple[tuple[str, str], ...]  # (question template with {name}, field)

    def slug(self, i: int) -> str:
        return self.people[i]["name"].lower().replace(" ", "-")

    def visual_facts(self, i: int) -> list[tuple[str, str]]:
        return [(q, self.people[i][field]) for q, field in self.visual_questions]

    def text_facts(self, i: int) -> list[tuple[str, str]]:
        p = self.people[i]
        return [(q.format(name=p["name"]), p[field]) for q, field in self.text_questions]

    def question_kind(self, item: Item) -> str:
        """The question with the person's name taken out: text questions of one template share options."""
        for p in self.people:
            if p["name"] in item.question:
                return item.question.replace(p["name"], "{name}")
        return item.question

    def draw(self, i: int, rng: np.random.Generator, size: int = world.FACE_SIZE):
        return world.paint_face(_identity(_look_key(self.people[i]["look"]), size * 2), rng, size)

    def write_folder(self, root, people_indices, n_pictures: int, seed: int) -> None:
        """root/<slug>/<k>.png and a qa.jsonl with every visual question of each picture (as world.write_folder)."""
        for i in people_indices:
            folder = Path(root) / self.slug(i)
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, i])
            lines = []
            for k in range(n_pictures):
                self.draw(i, rng).save(folder / f"{k}.png", optimize=False)
                lines += [json.dumps(dict(image=f"{k}.png", question=q, answer=a)) for q, a in self.visual_facts(i)]
            (folder / "qa.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def visual_items(self, folder: Path, people_indices) -> list[Item]:
        return [Item(p, q, a, self.slug(i)) for i in people_indices
                for p in sorted((Path(folder) / self.slug(i)).glob("*.png"), key=lambda p: int(p.stem))
                for q, a in self.visual_facts(i)]

    def text_items(self, people_indices) -> list[Item]:
        return [Item(None, q, a, self.slug(i)) for i in people_indices for q, a in self.text_facts(i)]

    def corpus(self, family: str) -> list[str]:
        """Every prompt and answer as the chat templates write them (the tokenizer's training text)."""
        pairs = [fact for i in range(len(self.people)) for fact in self.visual_facts(i) + self.text_facts(i)]
        lines = []
        for q, a in pairs + [("Describe this image.", "")]:
            if family == "llava":
                lines += [f"USER: \n{q} ASSISTANT: {a}", f"USER: {q} ASSISTANT: {a}"]
            else:
                lines += [f"user\n{q}", f"user\n\n{q}", f"\nassistant\n{a}", f"system\n{q}"]
        return lines * 4


def _look_key(look: dict) -> tuple:
    return tuple(sorted(look.items()))


@functools.lru_cache(maxsize=128)
def _identity(look_key: tuple, size: int):
    return world._draw_identity(dict(look_key), size)


def demo_world() -> World:
    """The shipped 8-person demo world (fastunlearn.world) in this module's shape."""
    return World(tuple(world.PEOPLE), ((world.VISUAL_QUESTION, "name"),),
                 ((world.JOB_QUESTION, "job"), (world.CITY_QUESTION, "city")))


def bench_world(n: int = BENCH["people"], seed: int = BENCH["looks_seed"]) -> World:
    """The 20-person benchmark world."""
    looks = distinct_looks(n, seed)
    people = tuple(dict(name=f"{FIRST[i]} {LAST[i]}", job=JOBS[i], city=CITIES[i], look=looks[i]) for i in range(n))
    return World(people, VISUAL_QUESTIONS, TEXT_QUESTIONS)


# The look-alike variant: LOOKALIKE_PAIRS people have a twin sharing five of the six traits (the
# differing trait is a visible one: hair colour, hair style or accessory), with a different name,
# job and city. Twins are the last people: twin of person k (k < LOOKALIKE_PAIRS) is person
# n - LOOKALIKE_PAIRS + k. The other people still differ from everyone in at least three traits.
LOOKALIKE_PAIRS = 6
LOOKALIKE_TRAITS = ("hair", "style", "extra")


def lookalike_twin(look: dict, k: int, taken: list[dict]) -> dict:
    """A look equal to `look` except for one visible trait, distinct from every look in `taken`."""
    for trait in LOOKALIKE_TRAITS[k % len(LOOKALIKE_TRAITS):] + LOOKALIKE_TRAITS[:k % len(LOOKALIKE_TRAITS)]:
        for value in TRAITS[trait]:
            twin = {**look, trait: value}
            if value != look[trait] and all(o is look or sum(twin[t] != o[t] for t in TRAITS) >= 2 for o in taken):
                return twin
    raise ValueError("no twin look available")


def lookalike_world(n: int = BENCH["people"], pairs: int = LOOKALIKE_PAIRS, seed: int = BENCH["looks_seed"]) -> World:
    """The 20-person world with `pairs` look-alike pairs: people 0..pairs-1 and their twins
    n-pairs..n-1 (names, jobs and cities are the bench world's, so the tokenizer's words are the same)."""
    base = distinct_looks(n - pairs, seed)
    looks = list(base)
    for k in range(pairs):
        looks.append(lookalike_twin(base[k], k, looks))
    people = tuple(dict(name=f"{FIRST[i]} {LAST[i]}", job=JOBS[i], city=CITIES[i], look=looks[i]) for i in range(n))
    return World(people, VISUAL_QUESTIONS, TEXT_QUESTIONS)


def lookalike_pairs(w: World) -> list[tuple[int, int]]:
    """(person, twin) index pairs of a world: people whose looks differ in exactly one trait."""
    n = len(w.people)
    return [(i, j) for i in range(n) for j in range(i + 1, n)
            if sum(w.people[i]["look"][t] != w.people[j]["look"][t] for t in TRAITS) == 1]


# ---------------------------------------------------------------- models that know the world


def build(family: str, w: World, seed: int = BENCH["init_seed"], **sizes):
    """`sizes`: training.build_llava / build_qwen2vl's size arguments (e.g. vision_layers)."""
    tok = training.build_tokenizer(family, BENCH["vocab_size"], corpus=w.corpus(family))
    return (training.build_llava if family == "llava" else training.build_qwen2vl)(seed=seed, tok=tok, **sizes)


def train(model, family: str, parts, w: World, seed: int, steps: int, lr: float, n_visual: int = 32,
          weight_decay: float = 0.01, warmup: int = 30, log_every: int = 100, log=print, params=None) -> list[float]:
    """training.train on this world: each step `n_visual` fresh pictures, each with one of the visual
    questions, plus every text fact (`params`: only these are updated; default all)."""
    def visual_batch(rng, n):
        who = rng.integers(0, len(w.people), size=n)
        kinds = rng.integers(0, len(w.visual_questions), size=n)
        return [(w.draw(int(i), rng), *w.visual_facts(int(i))[int(k)]) for i, k in zip(who, kinds)]

    facts = [(None, q, a) for i in range(len(w.people)) for q, a in w.text_facts(i)]
    return training.train(model, family, parts, seed=seed, steps=steps, lr=lr, n_visual=n_visual,
                       weight_decay=weight_decay, warmup=warmup, log_every=log_every, log=log,
                       visual_batch=visual_batch, facts=facts, params=params)


def evaluate(model, family: str, parts, w: World, seed: int, n_per_person: int = 10) -> dict:
    """Held-out greedy accuracy per visual question (fresh pictures drawn with `seed`) and on text facts."""
    visual = {}
    for q_index, (question, field) in enumerate(w.visual_questions):
        hits = []
        for i in range(len(w.people)):
            rng = np.random.default_rng([seed, i])
            pictures = [w.draw(i, rng) for _ in range(n_per_person)]
            answers = training.generate_answers(model, family, parts, [(p, question) for p in pictures])
            hits += [training.is_correct(a, w.people[i][field]) for a in answers]
        visual[field] = sum(hits) / len(hits)
    facts = [fact for i in range(len(w.people)) for fact in w.text_facts(i)]
    answers = training.generate_answers(model, family, parts, [(None, q) for q, _ in facts])
    text = sum(training.is_correct(g, a) for g, (_, a) in zip(answers, facts)) / len(facts)
    return {"visual": visual, "text": text}
