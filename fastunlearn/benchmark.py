"""`fastunlearn evaluate`: a benchmark's own metrics (MLLMU-Bench or CLEAR) of two checkpoints.

    fastunlearn evaluate ORIGINAL UNLEARNED --benchmark mllmu-bench|clear --forget DIR [--test DIR]
                         [--retain DIR] [--celebrity DIR] [--world DIR] [--text FILE] [--json] [--report FILE]

The folders are `fastunlearn convert`'s (fastunlearn.data's format with its optional "kind" and
"options"); each set is scored on both checkpoints with the benchmark's prompts, by greedy
decoding, and the scores are printed as the paper lays them out (rows: the sets; columns: the
tasks; each cell before -> after).

MLLMU-Bench, as github.com/franciscoliu/MLLMU-Bench eval.py writes it (evaluate_classification,
evaluate_fill_in_the_blank, evaluate_generation; 50 new tokens):
  - classification ("choice" lines): the question, then a line "A: <option>" per option, then
    "Just give ONE letter representing the answer directly."; the first character of the answer,
    upper-cased, is the model's choice when it is an option's letter; accuracy in %.
  - generation ("generation" lines): the question, then "Answer the question based on your trained
    knowledge in one sentence accurately in ENGLISH." ("... in one sentence in ENGLISH." for
    text-only questions); ROUGE-L F1 (rouge-score, use_stemmer=True) and BLEU (nltk's sentence_bleu
    on whitespace tokens, smoothing method1) against the ground truth.
  - cloze ("cloze" lines): the question with "__" written "[Blank]", then "Please **ONLY** provide
    the correct answer that should replace the [Blank]."; correct when the answer contains the
    ground truth (case-insensitive); accuracy in %.
  - the test set is restricted to the forget set's people (eval.py keeps the Test_Set rows whose ID
    is in the forget split); person folders are matched by name.
  Differences, on purpose: eval.py prepends few-shot examples (one or two profiles with their own
  pictures) to classification and cloze prompts; a fastunlearn prompt holds one picture, so the
  prompts here are zero-shot. eval.py picks one of a Test_Set profile's pictures at random; here
  every picture is scored (the mean is that draw's expectation). The checkpoint's chat template
  wraps the user turn (for LLaVA-1.5: "USER: <image>\\n... ASSISTANT:", as eval.py writes it by hand).
CLEAR, as github.com/somvy/multimodal_unlearning mm/eval.py and mm/dataset.py write it (300 new
tokens, config/mm/eval.yaml):
  - name ("Who is in this image?" lines of the forget / retain splits, and every line of the
    real_faces set, --celebrity): asked as "The name of the person on the image is "
    (question_strategy random_faces);
  - caption ("Describe this image." lines): asked as one of dataset.py's IMAGE_CAPTION_QUESTIONS,
    drawn at random there, chosen by the picture's sha256 here (random_caption);
  - qa (real_world, --world, and text lines): the question as stored (question_strategy column);
  each scored by ROUGE-L recall (rouge-score, use_stemmer=True), as eval_rouge_recall does. CLEAR's
  "Prob." and "Truth Ratio" need its perturbed answers, which `convert` does not keep: not computed.
  eval.py generates from the decoded text prompt, without the picture; here the picture is given
  (a projector edit changes nothing without it).

ROUGE-L is computed here, not by rouge-score (which would pull absl-py and nltk into fastunlearn's
dependencies for forty lines): rouge-score's tokenizer (lower-case, every run of characters other
than a-z and 0-9 is a separator, tokens longer than 3 characters stemmed) and its exact LCS
precision / recall / F1 (rouge_scorer._score_lcs). Both benchmarks score with use_stemmer=True,
i.e. nltk's Porter stemmer: it is used when nltk is installed (`pip install 'fastunlearn[benchmark]'`); without it the
tokens are not stemmed, and the result says so ("rouge_stemmed": false). BLEU is nltk's
sentence_bleu with SmoothingFunction().method1, re-implemented the same way (no nltk needed).
tests/test_benchmark.py checks both by hand-computed values, and against rouge-score and nltk
themselves when they are installed (equal to 1e-12 on 200 random pairs with rouge-score 0.1.2 and
nltk 3.10.4).
"""
from __future__ import annotations

import functools
import gc
import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import safetensors_io as st
from .data import DEFAULT_QUESTIONS, KINDS, Item, _lines, kind_and_options, read_folder
from .errors import UserError

BENCHMARKS = ("mllmu-bench", "clear")
SOURCES = {"mllmu-bench": "github.com/franciscoliu/MLLMU-Bench eval.py",
           "clear": "github.com/somvy/multimodal_unlearning mm/eval.py, mm/dataset.py, config/mm/eval.yaml"}
TITLE = {"mllmu-bench": "MLLMU-Bench", "clear": "CLEAR"}
MAX_NEW_TOKENS = {"mllmu-bench": 50, "clear": 300}
CHOICE_TOKENS = 5  # only the answer's first non-blank character counts

# MLLMU-Bench eval.py
GENERATION_IMAGE = "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH."
GENERATION_TEXT = "Answer the question based on your trained knowledge in one sentence in ENGLISH."
CHOICE = "Just give ONE letter representing the answer directly."
CLOZE = "Please **ONLY** provide the correct answer that should replace the [Blank]."
# CLEAR mm/dataset.py
NAME_PROMPT = "The name of the person on the image is "
IMAGE_CAPTION_QUESTIONS = (
    "What can you see in this picture?",
    "Tell me about the content of this image",
    "Can you give a description of the image?",
    "What is depicted in the image?",
    "Explain what you observe in the picture.",
    "Describe the image in detail.",
    "What is the main subject of this image?",
    "Can you describe the scene or objects in the image?",
    "What is happening in this image?",
)
WHO, DESCRIBE = DEFAULT_QUESTIONS  # the questions `convert clear` writes for the name and the caption

# (metric, the column of the questions it scores, table header), in the paper's column order
METRICS = {
    "mllmu-bench": (("classification", "classification", "classification %"),
                    ("generation_rouge_l", "generation", "generation ROUGE-L"),
                    ("generation_bleu", "generation", "generation BLEU"),
                    ("cloze", "cloze", "cloze %")),
    "clear": (("name_rouge_l_recall", "name", "name ROUGE-L recall"),
              ("caption_rouge_l_recall", "caption", "caption ROUGE-L recall"),
              ("qa_rouge_l_recall", "qa", "QA ROUGE-L recall")),
}
SETS = ("forget", "test", "retain", "celebrity", "world", "text")
LABELS = {"forget": "forget", "test": "test (forget people, new pictures)", "retain": "retain",
          "celebrity": "real celebrities", "world": "real world", "text": "text only"}


# ---------------------------------------------------------------- metrics (pure functions)

_SEPARATORS = re.compile(r"[^a-z0-9]+")
_TOKEN = re.compile(r"^[a-z0-9]+$")


@functools.lru_cache(maxsize=1)
def porter_stem():
    """nltk's Porter stemmer (the one rouge-score uses), memoised; None when nltk is not installed."""
    try:
        from nltk.stem.porter import PorterStemmer
    except ImportError:
        return None
    return functools.lru_cache(maxsize=65536)(PorterStemmer().stem)


def rouge_tokens(text: str, stem: bool = True) -> list[str]:
    """rouge-score's tokenizer: lower-case, split at every run of characters other than a-z / 0-9,
    stem tokens longer than 3 characters (when `stem` and nltk is installed)."""
    tokens = _SEPARATORS.sub(" ", text.lower()).split()
    stemmer = porter_stem() if stem else None
    if stemmer is not None:
        tokens = [stemmer(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if _TOKEN.match(t)]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(reference: str, prediction: str, stem: bool = True) -> tuple[float, float, float]:
    """ROUGE-L (precision, recall, F1) of a prediction against one reference, as rouge-score's
    RougeScorer(["rougeL"]).score(reference, prediction); 0 when either has no token."""
    ref, pred = rouge_tokens(reference, stem), rouge_tokens(prediction, stem)
    if not ref or not pred:
        return 0.0, 0.0, 0.0
    common = lcs_length(ref, pred)
    precision, recall = common / len(pred), common / len(ref)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def bleu(reference: str, prediction: str) -> float:
    """nltk's sentence_bleu([reference.split()], prediction.split(), smoothing_function=
    SmoothingFunction().method1): 4-gram BLEU, uniform weights, a zero n-gram count replaced by
    0.1, brevity penalty; 0 when no word of the prediction is in the reference."""
    ref, hyp = reference.split(), prediction.split()
    logs = []
    for n in range(1, 5):
        hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        matches = sum(min(count, ref_grams[gram]) for gram, count in hyp_grams.items())
        total = max(1, sum(hyp_grams.values()))
        if n == 1 and matches == 0:
            return 0.0
        logs.append(0.25 * math.log(matches / total if matches else 0.1 / total))
    penalty = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return penalty * math.exp(math.fsum(logs))


def choice_letter(output: str, letters) -> str | None:
    """The letter a multiple-choice answer picks: its first non-blank character, upper-cased, when
    that is one of the letters (eval.py's rule); None otherwise."""
    text = output.strip()
    return text[0].upper() if text and text[0].upper() in letters else None


def cloze_correct(output: str, answer: str) -> bool:
    """Does the answer fill the blank: the output contains it, case-insensitively (eval.py's rule)."""
    return answer.lower() in output.lower()


def mean(values: list[float]) -> float | None:
    return round(math.fsum(values) / len(values), 6) if values else None


# ---------------------------------------------------------------- questions -> benchmark prompts


@dataclass
class Task:
    item: Item  # the picture (None: text only) and subject
    prompt: str  # the user turn as the benchmark writes it
    column: str  # the table column it counts towards
    answer: str  # the reference answer; for a choice, the correct option's letter


def make_task(benchmark: str, item: Item, set_name: str = "") -> Task | None:
    """The benchmark's prompt for one question of a set, or None when the benchmark has no such
    question."""
    if benchmark == "clear":
        if item.kind != "generation":
            return None
        if item.image is not None and (item.question == WHO or set_name == "celebrity"):  # real_faces: random_faces
            return Task(item, NAME_PROMPT, "name", item.answer)
        if item.image is not None and item.question == DESCRIBE:
            question = IMAGE_CAPTION_QUESTIONS[int(st.sha256_file(item.image), 16) % len(IMAGE_CAPTION_QUESTIONS)]
            return Task(item, question, "caption", item.answer)
        return Task(item, item.question, "qa", item.answer)
    if item.kind == "choice":
        options = "\n".join(f"{letter}: {text}" for letter, text in item.options.items())
        letter = next(k for k, v in item.options.items() if v == item.answer)
        return Task(item, f"{item.question}\n{options}\n{CHOICE}", "classification", letter)
    if item.kind == "cloze":
        return Task(item, f"{item.question.replace('__', '[Blank]')}\n{CLOZE}", "cloze", item.answer)
    return Task(item, f"{item.question}\n{GENERATION_IMAGE if item.image is not None else GENERATION_TEXT}",
                "generation", item.answer)


def read_text_file(path: Path) -> list[Item]:
    """Text-only questions, a JSON object a line: "question", "answer", optional "kind", "options",
    "subject" (what `convert` writes to OUT_DIR/<split>.text.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: text question file does not exist (give a .jsonl file, e.g. OUT_DIR/<split>.text.jsonl)")
    items = []
    for lineno, line in _lines(path):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise UserError(f"{where}: not a JSON object in UTF-8") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip() for k in ("question", "answer")):
            raise UserError(f'{where}: expected {{"question": "...", "answer": "..."}} (optional "kind", "options", "subject")')
        kind, options = kind_and_options(obj, where)
        items.append(Item(None, obj["question"].strip(), obj["answer"].strip(), str(obj.get("subject", "")), kind, options))
    return items


def read_tasks(benchmark: str, name: str, source: Path) -> list[Task]:
    """The benchmark's questions of one set: a converted folder, or the text file."""
    items = read_text_file(source) if name == "text" else read_folder(source, name, KINDS)
    tasks = [t for t in (make_task(benchmark, it, name) for it in items if it.answer is not None) if t is not None]
    if not tasks:
        raise UserError(f"{source}: no {TITLE[benchmark]} questions in it (give a split converted with "
                        f"`fastunlearn convert {benchmark}`)")
    return tasks


def restrict_to(tasks: list[Task], subjects: set[str], source: Path) -> list[Task]:
    """The test set's questions about the forget set's people (eval.py's test mode)."""
    kept = [t for t in tasks if t.item.subject in subjects]
    if not kept:
        raise UserError(f"{source}: no pictures of the forget set's people (person folders are matched by name; "
                        "give the converted Test_Set and the converted forget split)")
    return kept


# ---------------------------------------------------------------- the models' answers and the scores


def score_task(benchmark: str, task: Task, output: str, stem: bool = True) -> dict[str, float]:
    """The metric values of one answer (accuracies in %, ROUGE and BLEU in [0, 1])."""
    if benchmark == "clear":
        return {f"{task.column}_rouge_l_recall": rouge_l(task.answer, output, stem)[1]}
    response = output.split("ASSISTANT:")[0].strip()  # eval.py reads the answer up to a repeated "ASSISTANT:"
    if task.column == "classification":
        return {"classification": 100.0 * (choice_letter(response, task.item.options) == task.answer)}
    if task.column == "cloze":
        return {"cloze": 100.0 * cloze_correct(response, task.answer)}
    return {"generation_rouge_l": rouge_l(task.answer, response, stem)[2], "generation_bleu": bleu(task.answer, response)}


def summarise(benchmark: str, scores: list[dict[str, float]]) -> dict[str, float | None]:
    """Each metric's mean over the questions that have it (None: no such question in the set)."""
    return {metric: mean([s[metric] for s in scores if metric in s]) for metric, _, _ in METRICS[benchmark]}


def answer_tasks(ckpt: Path, sets: dict[str, list[Task]], device, max_new_tokens: int, batch_size: int) -> dict[str, list[str]]:
    """One checkpoint's greedy answers to every set's prompts (vision features cached once, then
    decoding on the cached features with the checkpoint's own connector)."""
    from .evaluate import greedy_generate
    from .features import cache_samples, drop_vision_tower
    from .load import master_params, open_checkpoint

    loaded = open_checkpoint(ckpt, device)
    prompts = {name: cache_samples(loaded, [Item(t.item.image, t.prompt, None, t.item.subject) for t in tasks], name)
               for name, tasks in sets.items()}
    drop_vision_tower(loaded)
    params = master_params(loaded)
    answers = {}
    for name, tasks in sets.items():
        out: list[str | None] = [None] * len(tasks)
        for choice in (True, False):
            idx = [i for i, t in enumerate(tasks) if (t.column == "classification") == choice]
            if idx:
                texts = greedy_generate(loaded, params, [prompts[name][i] for i in idx],
                                        CHOICE_TOKENS if choice else max_new_tokens, batch_size)
                for i, text in zip(idx, texts):
                    out[i] = text
        answers[name] = out
    del loaded, params, prompts
    gc.collect()
    return answers


def evaluate_benchmark(original, unlearned, benchmark: str, forget, test=None, retain=None, celebrity=None, world=None,
                       text=None, device="auto", max_new_tokens: int | None = None, batch_size: int = 16) -> dict:
    """The benchmark's metrics of both checkpoints on the sets given (folders from `fastunlearn
    convert`; `text`: a text question file). Returns a plain dict: per set, the number of questions
    of each task and each metric before (ORIGINAL) and after (UNLEARNED)."""
    from . import journal
    from .config import pick_device
    from .load import inspect_checkpoint
    from .report import environment

    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
    max_new_tokens = MAX_NEW_TOKENS[benchmark] if max_new_tokens is None else max_new_tokens
    if max_new_tokens < 1 or batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size must be at least 1")
    device = pick_device(device)
    given = {"forget": forget, "test": test, "retain": retain, "celebrity": celebrity, "world": world, "text": text}
    sets = {name: read_tasks(benchmark, name, Path(source)) for name, source in given.items() if source is not None}
    if "test" in sets:
        sets["test"] = restrict_to(sets["test"], {t.item.subject for t in sets["forget"]}, Path(test))
    for ckpt in (original, unlearned):
        inspect_checkpoint(ckpt)
        journal.recover(ckpt)
    stem = porter_stem() is not None
    started = time.perf_counter()
    result_sets = {name: {"questions": dict(Counter(t.column for t in tasks))} for name, tasks in sets.items()}
    for when, ckpt in (("before", original), ("after", unlearned)):
        answers = answer_tasks(Path(ckpt), sets, device, max_new_tokens, batch_size)
        for name, tasks in sets.items():
            scores = [score_task(benchmark, t, a, stem) for t, a in zip(tasks, answers[name])]
            result_sets[name][when] = summarise(benchmark, scores)
    return {
        "fastunlearn_evaluate": 1,
        "benchmark": benchmark,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "original": str(Path(original).resolve()),
        "unlearned": str(Path(unlearned).resolve()),
        "prompts": SOURCES[benchmark] + " (zero-shot; see fastunlearn/benchmark.py)",
        "max_new_tokens": max_new_tokens,
        "rouge_stemmed": stem,
        "metrics": {metric: header for metric, _, header in METRICS[benchmark]},
        "sets": result_sets,
        "seconds": round(time.perf_counter() - started, 1),
        "environment": environment(str(device)),
    }


# ---------------------------------------------------------------- the paper's table


def _cell(metric: str, before, after) -> str:
    if before is None:
        return "-"
    digits = 1 if metric in ("classification", "cloze") else 3
    return f"{before:.{digits}f} -> {after:.{digits}f}"


def table_lines(result: dict) -> list[str]:
    """The paper's layout: a row per set, a column per task, each cell "before -> after"."""
    benchmark = result["benchmark"]
    metrics = METRICS[benchmark]
    label = dict(LABELS, celebrity="real faces") if benchmark == "clear" else LABELS
    rows = [[label[name], str(sum(s["questions"].values()))] + [_cell(m, s["before"][m], s["after"][m]) for m, _, _ in metrics]
            for name, s in result["sets"].items()]
    header = [f"{TITLE[benchmark]}: before -> after", "questions"] + [h for _, _, h in metrics]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    stem = "stemmed" if result["rouge_stemmed"] else "NOT stemmed: pip install 'fastunlearn[benchmark]' for the benchmark's stemmed ROUGE"
    return [line(header)] + [line(r) for r in rows] + [
        f"(ROUGE-L tokens {stem}; prompts: {result['prompts']}; {result['seconds']} s)"]
