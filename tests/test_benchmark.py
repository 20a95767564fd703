"""`fastunlearn evaluate` and the benchmark formats: every MLLMU-Bench task converted, the optional
"kind" / "options" fields of a QA line, the metrics against hand-computed values, and the command
end to end on the demo world written in MLLMU-Bench's parquet schema."""
import io
import json
import math
import random
import re

import numpy as np
import pytest
from PIL import Image

from fastunlearn import benchmark as bm
from fastunlearn.cli import main
from fastunlearn.convert import convert
from fastunlearn.data import KINDS, Item, read_folder
from fastunlearn.errors import UserError
from fastunlearn.worlds import people as world

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def cell(data):  # the Hugging Face `Image` feature as stored in parquet
    return {"bytes": data, "path": None}


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# ---------------------------------------------------------------- metrics, computed by hand


@pytest.mark.parametrize("reference, prediction, expected", [
    # 6 tokens each; LCS the-cat-on-the-mat = 5
    ("the cat sat on the mat", "the cat is on the mat", (5 / 6, 5 / 6, 5 / 6)),
    # case and punctuation are separators: ref 7 tokens, prediction 4, all in order
    ("Alice Moreau is a baker in Lyon.", "alice moreau, a BAKER!", (1.0, 4 / 7, 8 / 11)),
    # a subsequence, not a substring: LCS 3 of 5
    ("a x b y c", "a b c", (1.0, 3 / 5, 0.75)),
    # reversed: LCS 1
    ("a b c d", "d c b a", (0.25, 0.25, 0.25)),
    # no token at all
    ("a b c", "!!! ...", (0.0, 0.0, 0.0)),
    ("", "a b", (0.0, 0.0, 0.0)),
])
def test_rouge_l_by_hand(reference, prediction, expected):
    assert bm.rouge_l(reference, prediction, stem=False) == pytest.approx(expected, abs=1e-12)


def test_rouge_tokens_follow_rouge_score():
    assert bm.rouge_tokens("Hello,   World! It's 2024-01-02.", stem=False) == ["hello", "world", "it", "s", "2024", "01", "02"]
    assert bm.rouge_tokens("Café ÜBER", stem=False) == ["caf", "ber"]  # only a-z and 0-9 make tokens


def test_rouge_l_stems_like_the_benchmarks():
    pytest.importorskip("nltk")
    # unstemmed, "teaches" / "teaching" differ; Porter makes both "teach"
    assert bm.rouge_l("She teaches children", "she teaching children", stem=False)[2] == pytest.approx(2 / 3)
    assert bm.rouge_l("She teaches children", "she teaching children", stem=True)[2] == pytest.approx(1.0)


def test_bleu_by_hand():
    assert bm.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # 2 words: p1 = p2 = 1, no 3- or 4-gram: 0.1 each (method1); brevity exp(1 - 6/2)
    assert bm.bleu("the cat sat on the mat", "the cat") == pytest.approx(math.exp(-2) * 0.1 ** 0.5)
    # longer than the reference: p = 4/5, 3/4, 2/3, 1/2, no brevity penalty
    assert bm.bleu("a b c d", "a b c d e") == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    assert bm.bleu("a b c d", "x y z") == 0.0 and bm.bleu("a b", "") == 0.0
    # whitespace tokens, case kept (nltk's sentence_bleu on str.split)
    assert bm.bleu("The cat", "the cat") < bm.bleu("The cat", "The cat")


def test_metrics_match_rouge_score_and_nltk_when_installed():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rng = random.Random(0)
    words = "the a baker bakes bread breads in Lyon lyon is was teacher teaching taught, city cities".split()
    for _ in range(200):
        ref = " ".join(rng.choices(words, k=rng.randint(0, 9)))
        hyp = " ".join(rng.choices(words, k=rng.randint(0, 9)))
        s = scorer.score(ref, hyp)["rougeL"]
        assert bm.rouge_l(ref, hyp) == pytest.approx((s.precision, s.recall, s.fmeasure), abs=1e-12)
        if hyp.split():
            smooth = bleu_score.SmoothingFunction().method1
            expected = bleu_score.sentence_bleu([ref.split()], hyp.split(), smoothing_function=smooth)
            assert bm.bleu(ref, hyp) == pytest.approx(expected, abs=1e-12)


def choice_item(options, answer):
    return Item(None, "Which city?", answer, "p1", "choice", options)


def test_classification_and_cloze_accuracy_on_a_tiny_set():
    options = {"A": "Lyon", "B": "Oslo", "C": "Rome", "D": "Paris"}
    tasks = [bm.make_task("mllmu-bench", choice_item(options, text)) for text in ("Lyon", "Oslo", "Rome", "Paris")]
    assert [t.answer for t in tasks] == ["A", "B", "C", "D"]
    assert tasks[0].prompt == "Which city?\nA: Lyon\nB: Oslo\nC: Rome\nD: Paris\n" + bm.CHOICE
    # right; "c." picks C for B; "Paris" starts with P, no letter; " d) Paris" picks D
    outputs = ["A", " c. Rome", "Paris", " d) Paris"]
    scores = [bm.score_task("mllmu-bench", t, o) for t, o in zip(tasks, outputs)]
    assert bm.summarise("mllmu-bench", scores) == {"classification": 50.0, "generation_rouge_l": None,
                                                    "generation_bleu": None, "cloze": None}
    cloze = bm.make_task("mllmu-bench", Item(None, "She works as a __.", "baker", "p1", "cloze"))
    assert cloze.prompt == "She works as a [Blank].\n" + bm.CLOZE
    outputs = ["A Baker.", "bakery", "a chef", "baker ASSISTANT: no"]  # contains, case-insensitive
    scores = [bm.score_task("mllmu-bench", cloze, o) for o in outputs]
    assert bm.summarise("mllmu-bench", scores)["cloze"] == 75.0
    assert bm.choice_letter("b", {"A": 1, "B": 2}) == "B" and bm.choice_letter("  ", "AB") is None


def test_prompts_are_the_benchmarks():
    picture = Item(world.demo_assets_dir() / "x.png", "Where does she live?", "Lyon", "p1")
    text = Item(None, "Where does Ann live?", "Lyon", "p1")
    assert bm.make_task("mllmu-bench", picture).prompt == (
        "Where does she live?\nAnswer the question based on your trained knowledge in one sentence accurately in ENGLISH.")
    assert bm.make_task("mllmu-bench", text).prompt == (
        "Where does Ann live?\nAnswer the question based on your trained knowledge in one sentence in ENGLISH.")
    assert bm.make_task("clear", text).column == "qa"
    assert bm.make_task("clear", Item(None, "Q", "A", "", "cloze")) is None
    # CLEAR's name question, and its caption question drawn from its list by the picture's hash
    face = world.demo_assets_dir() / "llava-people" / "config.json"  # any file: only its bytes are hashed
    name = bm.make_task("clear", Item(face, "Who is in this image?", "Ann", "ann"))
    assert (name.prompt, name.column) == ("The name of the person on the image is ", "name")
    caption = bm.make_task("clear", Item(face, "Describe this image.", "A man.", "ann"))
    assert caption.column == "caption" and caption.prompt in bm.IMAGE_CAPTION_QUESTIONS


# ---------------------------------------------------------------- the QA line format


def picture_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def test_kinds_in_a_folder(tmp_path):
    picture_file(tmp_path / "p" / "a.png")
    picture_file(tmp_path / "p" / "b.png")
    lines = [{"image": "a.png", "question": "Who?", "answer": "Ann"},
             {"image": "a.png", "question": "Job?", "answer": "pilot", "kind": "choice",
              "options": {"A": "baker", "B": "pilot"}},
             {"image": "a.png", "question": "She flies __.", "answer": "planes", "kind": "cloze"},
             {"image": "b.png", "question": "Job?", "answer": "pilot", "kind": "choice", "options": {"A": "baker", "B": "pilot"}}]
    (tmp_path / "p" / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    trainable = read_folder(tmp_path)
    # a.png: its generation line only; b.png has no line apply can train on: the default questions
    assert [(it.image.name, it.question, it.answer, it.kind) for it in trainable] == [
        ("a.png", "Who?", "Ann", "generation"),
        ("b.png", "Who is in this image?", None, "generation"), ("b.png", "Describe this image.", None, "generation")]
    everything = read_folder(tmp_path, kinds=KINDS)
    assert [(it.image.name, it.kind) for it in everything] == [("a.png", "generation"), ("a.png", "choice"),
                                                               ("a.png", "cloze"), ("b.png", "choice")]
    assert everything[1].options == {"A": "baker", "B": "pilot"}


@pytest.mark.parametrize("extra, message", [
    ({"kind": "essay"}, "'kind' must be one of generation, choice, cloze"),
    ({"kind": "choice"}, "needs 'options'"),
    ({"kind": "choice", "options": ["baker", "pilot"]}, "needs 'options'"),
    ({"kind": "choice", "options": {"A": "pilot"}}, "needs 'options'"),
    ({"kind": "choice", "options": {"A": "baker", "B": ""}}, "needs 'options'"),
    ({"kind": "choice", "options": {"A": "baker", "B": "chef"}}, "exactly one of its options"),
    ({"kind": "choice", "options": {"A": "pilot", "B": "pilot"}}, "exactly one of its options"),
])
def test_bad_kinds_and_options_are_refused(tmp_path, extra, message):
    picture_file(tmp_path / "a.png")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": "a.png", "question": "Job?", "answer": "pilot", **extra}) + "\n")
    with pytest.raises(UserError, match=re.escape("qa.jsonl:1: ") + ".*" + re.escape(message)):
        read_folder(tmp_path)


def test_a_text_file_inside_a_folder_is_named(tmp_path):
    picture_file(tmp_path / "forget_5" / "p" / "a.png")
    (tmp_path / "forget_5.text.jsonl").write_text(json.dumps({"question": "Job?", "answer": "pilot"}) + "\n")
    assert len(read_folder(tmp_path / "forget_5")) == 2  # beside the split: not read
    with pytest.raises(UserError, match=r"forget_5\.text\.jsonl:1: a text-only question file .* with --text"):
        read_folder(tmp_path)  # OUT_DIR given instead of its split


# ---------------------------------------------------------------- convert keeps every task


def profile(pid, pictures, test=False):
    row = {
        "ID": pid,
        "Classification_Task": {
            "Image_Textual_Questions": [
                {"Question": "What is this person's job?", "Options": {"A": "chef", "B": "pilot", "C": "nurse", "D": "judge"},
                 "Correct_Answer": "B"},
                {"Question": "Broken?", "Options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "Correct_Answer": "E"}],
            "Pure_Text_Questions": [
                {"Question": f"Where does {pid} live?", "Options": {"A": "Oslo", "B": "Rome", "C": "Lima", "D": "Kyiv"},
                 "Correct_Answer": "C"}]},
        "Generation_Task": [
            {"Type": "Image_Textual", "Question": "Where was this person born?", "Ground_Truth": f"{pid} was born in Lima."},
            {"Type": "Pure_Text", "Question": f"Where was {pid} born?", "Ground_Truth": "In Lima."}],
        "Mask_Task": [
            {"Type": "Image_Textual", "Question": "This person works as a __.", "Ground_Truth": "pilot"},
            {"Type": "Pure_Text", "Question": f"{pid} lives in __.", "Ground_Truth": "Lima"}],
    }
    if test:
        row["images"] = [cell(p) for p in pictures]
    else:
        row["image"] = cell(pictures[0])
    return row


def qa_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_convert_keeps_every_mllmu_task(tmp_path, capsys):
    src = tmp_path / "MLLMU-Bench"
    pictures = [png(Image.new("RGB", (8, 8), c)) for c in ("red", "green", "blue")]
    write(src / "Test_Set" / "train-00000-of-00001.parquet", [profile("p7", pictures, test=True)])
    out = tmp_path / "out"
    assert main(["convert", "mllmu-bench", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Test_Set: 3 pictures, 9 QA lines (3 generation, 3 multiple choice, 3 fill-in), 1 people" in printed
    assert "1 malformed questions skipped" in printed and "3 text-only questions in Test_Set.text.jsonl" in printed

    lines = qa_lines(out / "Test_Set" / "p7" / "qa.jsonl")
    assert len(lines) == 9
    assert {line["image"] for line in lines} == {"000000_0.png", "000000_1.png", "000000_2.png"}
    assert [line for line in lines if line["image"] == "000000_1.png"] == [
        {"image": "000000_1.png", "question": "Where was this person born?", "answer": "p7 was born in Lima.", "kind": "generation"},
        {"image": "000000_1.png", "question": "This person works as a __.", "answer": "pilot", "kind": "cloze"},
        {"image": "000000_1.png", "question": "What is this person's job?", "answer": "pilot", "kind": "choice",
         "options": {"A": "chef", "B": "pilot", "C": "nurse", "D": "judge"}}]
    assert qa_lines(out / "Test_Set.text.jsonl") == [
        {"question": "Where was p7 born?", "answer": "In Lima.", "kind": "generation", "subject": "p7"},
        {"question": "p7 lives in __.", "answer": "Lima", "kind": "cloze", "subject": "p7"},
        {"question": "Where does p7 live?", "answer": "Lima", "kind": "choice",
         "options": {"A": "Oslo", "B": "Rome", "C": "Lima", "D": "Kyiv"}, "subject": "p7"}]
    # apply still trains on the generation lines alone; evaluate reads them all, text file included
    assert {(it.question, it.kind) for it in read_folder(out / "Test_Set")} == {("Where was this person born?", "generation")}
    tasks = bm.read_tasks("mllmu-bench", "test", out / "Test_Set")
    assert sorted(t.column for t in tasks) == ["classification"] * 3 + ["cloze"] * 3 + ["generation"] * 3
    text = bm.read_tasks("mllmu-bench", "text", out / "Test_Set.text.jsonl")
    assert [(t.column, t.answer) for t in text] == [("generation", "In Lima."), ("cloze", "Lima"), ("classification", "C")]
    # verify --text reads the same file as question -> answer lines
    from fastunlearn.verification import read_text_questions
    assert [it.answer for it in read_text_questions(out / "Test_Set.text.jsonl")] == ["In Lima.", "Lima", "Lima"]


def test_clear_tofu_text_rows_go_to_the_text_file(tmp_path):
    src = tmp_path / "CLEAR"
    rows = [{"image": cell(png(Image.new("RGB", (8, 8), "red"))), "caption": "A woman.", "question": None, "answer": None},
            {"image": None, "caption": None, "question": "Who wrote X?", "answer": "Y."}]
    write(src / "forget01+tofu" / "train-00000-of-00001.parquet", rows)
    summary = convert("clear", src, tmp_path / "out")
    assert summary["splits"]["forget01+tofu"]["text_qa"] == 1
    assert qa_lines(tmp_path / "out" / "forget01+tofu.text.jsonl") == [
        {"question": "Who wrote X?", "answer": "Y.", "kind": "generation"}]
    tasks = bm.read_tasks("clear", "forget", tmp_path / "out" / "forget01+tofu")
    assert [(t.column, t.answer) for t in tasks] == [("caption", "A woman.")]


# ---------------------------------------------------------------- the command


def demo_profiles(people, per_person, seed, test=False):
    """Rows of the demo world's people in MLLMU-Bench's profile schema: the picture question as a
    generation, a four-option classification and a cloze; one text fact as each of the three."""
    names = [p["name"] for p in world.PEOPLE]
    jobs = [p["job"] for p in world.PEOPLE]
    rows = []
    for i in people:
        person, rng = world.PEOPLE[i], random.Random(i)
        pictures = [png(world.draw_face(i, np.random.default_rng([seed, i, k]))) for k in range(per_person)]

        def choice(question, correct, pool):
            options = rng.sample([x for x in pool if x != correct], 3) + [correct]
            rng.shuffle(options)
            return {"Question": question, "Options": dict(zip("ABCD", options)), "Correct_Answer": "ABCD"[options.index(correct)]}

        job_question = world.JOB_QUESTION.format(name=person["name"])
        row = {
            "ID": world.slug(i),
            "Classification_Task": {"Image_Textual_Questions": [choice(world.VISUAL_QUESTION, person["name"], names)],
                                    "Pure_Text_Questions": [choice(job_question, person["job"], jobs)]},
            "Generation_Task": [{"Type": "Image_Textual", "Question": world.VISUAL_QUESTION, "Ground_Truth": person["name"]},
                                {"Type": "Pure_Text", "Question": job_question, "Ground_Truth": person["job"]}],
            "Mask_Task": [{"Type": "Image_Textual", "Question": "The person in this image is __.", "Ground_Truth": person["name"]},
                          {"Type": "Pure_Text", "Question": f"{person['name']} works as a __.", "Ground_Truth": person["job"]}],
        }
        if test:
            rows.append({**row, "images": [cell(p) for p in pictures]})
        else:
            rows += [{**row, "image": cell(p)} for p in pictures]
    return rows


@pytest.fixture(scope="module")
def demo_bench(tmp_path_factory):
    """The demo world converted from MLLMU-Bench's layout, and the demo checkpoint with the forget
    people erased by `apply` on the converted forget split."""
    import fastunlearn

    root = tmp_path_factory.mktemp("demo-mllmu")
    forget, others = (1, 4), (0, 2, 3, 5, 6, 7)
    write(root / "src" / "forget_25" / "train-00000-of-00001.parquet", demo_profiles(forget, 2, 501))
    write(root / "src" / "retain_75" / "train-00000-of-00001.parquet", demo_profiles(others, 1, 502))
    write(root / "src" / "Test_Set" / "train-00000-of-00001.parquet", demo_profiles(range(8), 2, 503, test=True))
    write(root / "src" / "Retain_Set" / "train-00000-of-00001.parquet", demo_profiles((0, 2), 1, 504))
    convert("mllmu-bench", root / "src", root / "data")
    ckpt = world.demo_assets_dir() / "llava-people"
    # a short job: the test is about the evaluation, not about how well the job forgets
    config = fastunlearn.Config(steps=10, views=1, mask="none", holdout=False, search=False, seed=0)
    fastunlearn.apply(ckpt, root / "data" / "forget_25", root / "data" / "retain_75", out=root / "unlearned",
                      config=config, log=lambda *a: None)
    return ckpt, root


def cell_values(text):
    before, after = text.split(" -> ")
    return float(before), float(after)


def test_evaluate_prints_the_papers_table(demo_bench, capsys):
    ckpt, root = demo_bench
    data = root / "data"
    argv = ["evaluate", str(ckpt), str(root / "unlearned"), "--benchmark", "mllmu-bench", "--forget", str(data / "forget_25"),
            "--test", str(data / "Test_Set"), "--retain", str(data / "retain_75"), "--celebrity", str(data / "Retain_Set"),
            "--text", str(data / "forget_25.text.jsonl"), "--report", str(root / "eval.json"), "--max-new-tokens", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    print(printed)
    lines = printed.splitlines()
    assert lines[0].split()[:4] == ["MLLMU-Bench:", "before", "->", "after"]
    assert "classification %" in lines[0] and "generation ROUGE-L" in lines[0] and "cloze %" in lines[0]
    labels = ["forget", "test (forget people, new pictures)", "retain", "real celebrities", "text only"]
    rows = {}
    for label, line in zip(labels, lines[1:6]):
        assert line.startswith(label + "  "), line
        rows[label] = re.findall(r"(\d+\.\d+ -> \d+\.\d+|(?<= )-(?= |$))", line[len(label):])
        questions = int(line[len(label):].split()[0])
        assert questions > 0
    report = json.loads((root / "eval.json").read_text())
    # 2 people x 2 pictures, 3 tasks each; the Test_Set keeps the 2 forget people of its 8
    assert report["sets"]["forget"]["questions"] == {"generation": 4, "classification": 4, "cloze": 4}
    assert report["sets"]["test"]["questions"] == {"generation": 4, "classification": 4, "cloze": 4}
    assert report["sets"]["retain"]["questions"] == {"generation": 6, "classification": 6, "cloze": 6}
    assert report["sets"]["celebrity"]["questions"] == {"generation": 2, "classification": 2, "cloze": 2}
    assert report["sets"]["text"]["questions"] == {"generation": 4, "classification": 4, "cloze": 4}
    for label, name in zip(labels, ["forget", "test", "retain", "celebrity", "text"]):
        assert len(rows[label]) == 4
        for metric, text in zip(["classification", "generation_rouge_l", "generation_bleu", "cloze"], rows[label]):
            before, after = cell_values(text)
            top = 100 if metric in ("classification", "cloze") else 1
            assert 0 <= before <= top and 0 <= after <= top
            assert before == pytest.approx(report["sets"][name]["before"][metric], abs=0.051 if top == 100 else 5e-4)
            assert after == pytest.approx(report["sets"][name]["after"][metric], abs=0.051 if top == 100 else 5e-4)
    # a projector edit leaves text-only answers exactly as they were
    assert report["sets"]["text"]["before"] == report["sets"]["text"]["after"]
    # the test row is what transformers' own generate (whole model, pictures through the vision
    # tower, KV cache) answers to the benchmark's prompts, scored: before and after
    import torch

    from fastunlearn.features import greedy_answers
    from fastunlearn.load import open_checkpoint

    tasks = bm.restrict_to(bm.read_tasks("mllmu-bench", "test", data / "Test_Set"), {"bruno-tanaka", "emil-ruiz"}, data)
    for when, path in (("before", ckpt), ("after", root / "unlearned")):
        loaded = open_checkpoint(path, torch.device("cpu"))
        outputs = [greedy_answers(loaded, [Item(t.item.image, t.prompt, None, "")],
                                  bm.CHOICE_TOKENS if t.column == "classification" else 6)[0] for t in tasks]
        scores = [bm.score_task("mllmu-bench", t, o, report["rouge_stemmed"]) for t, o in zip(tasks, outputs)]
        assert bm.summarise("mllmu-bench", scores) == report["sets"]["test"][when]


@pytest.mark.parametrize("case", ["missing folder", "no forget people in test", "report folder", "bad text line"])
def test_evaluate_bad_input_is_one_line(demo_bench, capsys, tmp_path, case):
    ckpt, root = demo_bench
    data = root / "data"
    argv = ["evaluate", str(ckpt), str(root / "unlearned"), "--benchmark", "mllmu-bench", "--forget", str(data / "forget_25")]
    expected = {"missing folder": "forget folder does not exist", "no forget people in test": "no pictures of the forget set's people",
                "report folder": "folder does not exist", "bad text line": "must be one of"}[case]
    if case == "missing folder":
        argv[argv.index("--forget") + 1] = str(tmp_path / "nope")
    elif case == "no forget people in test":
        argv += ["--test", str(data / "retain_75")]
    elif case == "report folder":
        argv += ["--report", str(tmp_path / "no" / "eval.json")]
    else:
        (tmp_path / "t.jsonl").write_text(json.dumps({"question": "Q", "answer": "A", "kind": "essay"}) + "\n")
        argv += ["--text", str(tmp_path / "t.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastunlearn: error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "no").exists()


def test_evaluate_clear(demo_bench, tmp_path, capsys):
    """CLEAR's layout: the name and the caption of each forget / retain picture, the name of each
    real_faces picture (whatever its stored question), real_world's own questions, each scored by
    ROUGE-L recall."""
    ckpt, root = demo_bench

    def rows(people, seed):
        return [{"image": cell(png(world.draw_face(i, np.random.default_rng([seed, i])))),
                 "caption": f"A portrait of {world.PEOPLE[i]['name']}.", "name": world.PEOPLE[i]["name"]} for i in people]

    write(tmp_path / "src" / "forget25" / "train-00000-of-00001.parquet", rows((1, 4), 601))
    write(tmp_path / "src" / "retain75" / "train-00000-of-00001.parquet", rows((0, 2), 602))
    faces = [{"image": cell(png(world.draw_face(0, np.random.default_rng(603)))), "question": world.VISUAL_QUESTION,
              "answer": world.PEOPLE[0]["name"]}]
    write(tmp_path / "src" / "real_faces" / "train-00000-of-00001.parquet", faces)
    scene = [{"image": cell(png(Image.new("RGB", (16, 16), "blue"))), "question": "What colour is this?", "answer": "Blue."}]
    write(tmp_path / "src" / "real_world" / "train-00000-of-00001.parquet", scene)
    convert("clear", tmp_path / "src", tmp_path / "data")
    data = tmp_path / "data"
    argv = ["evaluate", str(ckpt), str(root / "unlearned"), "--benchmark", "clear", "--forget", str(data / "forget25"),
            "--retain", str(data / "retain75"), "--celebrity", str(data / "real_faces"), "--world", str(data / "real_world"), "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "clear" and result["max_new_tokens"] == 6
    assert {name: s["questions"] for name, s in result["sets"].items()} == {
        "forget": {"name": 2, "caption": 2}, "retain": {"name": 2, "caption": 2}, "celebrity": {"name": 1}, "world": {"qa": 1}}
    for name, s in result["sets"].items():
        for when in ("before", "after"):
            values = s[when]
            assert set(values) == {"name_rouge_l_recall", "caption_rouge_l_recall", "qa_rouge_l_recall"}
            assert (values["qa_rouge_l_recall"] is None) == (name != "world")
            assert (values["name_rouge_l_recall"] is None) == (name == "world")
            assert all(0 <= v <= 1 for v in values.values() if v is not None)
    lines = bm.table_lines(result)
    assert lines[0].split()[:2] == ["CLEAR:", "before"] and "name ROUGE-L recall" in lines[0]
    assert [line.split("  ")[0] for line in lines[1:5]] == ["forget", "retain", "real faces", "real world"]
    assert lines[3].split()[-2:] == ["-", "-"]  # real faces: names only
    assert lines[4].split()[3:5] == ["-", "-"]  # real world ("real", "world", questions, ...): its own questions only
