"""`fastunlearn convert`: benchmark parquet files (written here in the benchmarks' schemas) ->
forget / retain folders that fastunlearn.data.read_folder accepts."""
import io
import json
import random

import pytest
from PIL import Image

from fastunlearn.cli import main
from fastunlearn.convert import convert, find_splits, safe_name
from fastunlearn.data import read_folder
from fastunlearn.errors import UserError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def picture(color, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


def image_cell(data):  # the Hugging Face `Image` feature as stored in parquet
    return {"bytes": data, "path": None}


def write(path, rows, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def mllmu_row(pid, color, fmt="PNG"):
    return {
        "image": image_cell(picture(color, fmt)),
        "ID": pid,
        "biography": f"{pid} is a fictitious person.",
        "question": "What is this person's name?",
        "answer": f"This is {pid}.",
        "Classification_Task": {"Image_Textual_Questions": [{"Question": "Job?", "Options": {"A": "x", "B": "y", "C": "z", "D": "w"},
                                                             "Correct_Answer": "A"}],
                                "Pure_Text_Questions": []},
        "Generation_Task": [
            {"Type": "Image_Textual", "Question": f"Where was the person in the image born? ({pid})", "Ground_Truth": f"{pid}-town"},
            {"Type": "Pure_Text", "Question": f"Where was {pid} born?", "Ground_Truth": f"{pid}-town"},
            {"Type": "Image_Textual", "Question": "What is this person's job?", "Ground_Truth": f"{pid} bakes bread."},
        ],
        "Mask_Task": [{"Type": "Image_Textual", "Question": "This person works as a __.", "Ground_Truth": "baker"}],
    }


def qa_by_file(folder):
    """{picture path relative to folder: sorted (question, answer)} as read_folder sees them."""
    result = {}
    for item in read_folder(folder):
        result.setdefault(item.image.relative_to(folder.resolve()).as_posix(), []).append((item.question, item.answer))
    return {k: sorted(v) for k, v in result.items()}


def test_mllmu_bench_round_trip(tmp_path, capsys):
    src = tmp_path / "MLLMU-Bench"
    forget = [mllmu_row("p001", "red"), mllmu_row("p002", "blue", "JPEG")]
    retain = [mllmu_row("p003", "green"), mllmu_row("p004", "white")]
    write(src / "forget_5" / "train-00000-of-00001.parquet", forget)
    write(src / "retain_95" / "train-00000-of-00001.parquet", retain)
    (src / ".git").mkdir()  # hidden folders are not splits
    write(src / ".git" / "x" / "train-00000-of-00001.parquet", [{"foo": 1}])

    out = tmp_path / "out"
    assert main(["convert", "mllmu-bench", str(src), str(out)]) == 0
    assert "forget_5: 2 pictures, 8 QA lines (4 generation, 2 multiple choice, 2 fill-in), 2 people" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["forget_5", "forget_5.text.jsonl", "retain_95", "retain_95.text.jsonl"]

    got = qa_by_file(out / "forget_5")
    assert got == {
        "p001/000000.png": sorted([("Where was the person in the image born? (p001)", "p001-town"),
                                   ("What is this person's job?", "p001 bakes bread.")]),
        "p002/000001.jpg": sorted([("Where was the person in the image born? (p002)", "p002-town"),
                                   ("What is this person's job?", "p002 bakes bread.")]),
    }
    # the picture bytes are written as they are
    assert (out / "forget_5" / "p002" / "000001.jpg").read_bytes() == forget[1]["image"]["bytes"]
    assert set(qa_by_file(out / "retain_95")) == {"p003/000000.png", "p004/000001.png"}
    # one person folder is itself a usable forget folder
    assert len(read_folder(out / "forget_5" / "p001")) == 2


def test_mllmu_bench_summary_counts_and_test_set_images(tmp_path):
    src = tmp_path / "bench"
    row = mllmu_row("p009", "red")
    del row["image"]
    row["images"] = [image_cell(picture("red")), image_cell(picture("black"))]
    write(src / "Test_Set" / "train-00000-of-00001.parquet", [row])
    summary = convert("mllmu-bench", src, tmp_path / "out")
    assert summary["splits"] == {"Test_Set": {"rows": 1, "people": 1, "pictures": 2, "qa": 8, "generation": 4, "choice": 2,
                                              "cloze": 2, "text_qa": 1, "pictures_without_qa": 0,
                                              "skipped_no_picture": 0, "skipped_questions": 0}}
    assert set(qa_by_file(tmp_path / "out" / "Test_Set")) == {"p009/000000_0.png", "p009/000000_1.png"}


def test_mllmu_bench_training_split(tmp_path):
    """ft_Data / baseline_train_split: image + metadata (a JSON list of Question / Answer)."""
    src = tmp_path / "baseline_train_split"
    meta = json.dumps([{"Question": "Who is this?", "Answer": "Ann Lee"}, {"Question": "Her job?", "Answer": "Pilot"}])
    write(src / "forget_10" / "train-00000-of-00001.parquet", [{"image": image_cell(picture("red")), "ID": "7", "metadata": meta}])
    convert("mllmu-bench", src, tmp_path / "out")
    assert qa_by_file(tmp_path / "out" / "forget_10") == {"7/000000.png": [("Her job?", "Pilot"), ("Who is this?", "Ann Lee")]}


def test_clear_round_trip_with_hostile_names(tmp_path):
    src = tmp_path / "CLEAR"
    rows = [
        {"image": image_cell(picture("red")), "caption": "A man in a red room.", "name": "../../etc/Evil Name"},
        {"image": image_cell(picture("blue")), "caption": "The same man, outdoors.", "name": "../../etc/Evil Name"},
        {"image": image_cell(picture("green")), "caption": "Another person.", "name": "..  etc Evil Name"},
        {"image": image_cell(picture("white")), "caption": "Dots only.", "name": ".."},
    ]
    # the parquet-converter layout: config/split/0000.parquet
    write(src / "forget05" / "train" / "0000.parquet", rows)
    tofu = [{"image": image_cell(picture("black")), "caption": "A woman.", "question": None, "answer": None},
            {"image": None, "caption": None, "question": "Who wrote X?", "answer": "Y."}]
    write(src / "retain95+tofu" / "train-00000-of-00001.parquet", tofu)

    summary = convert("clear", src, tmp_path / "out")
    out = (tmp_path / "out").resolve()
    assert set(summary["splits"]) == {"forget05", "retain95+tofu"}
    assert summary["splits"]["retain95+tofu"]["skipped_no_picture"] == 1
    for path in out.rglob("*"):  # nothing escaped, no dot-folders
        assert path.resolve().is_relative_to(out) and not path.name.startswith(".")
    got = qa_by_file(out / "forget05")
    assert len(got) == 4
    folders = {k.split("/")[0] for k in got}
    assert len(folders) == 3  # two rows of one person share a folder; distinct names stay distinct
    [red] = [qa for file, qa in got.items() if file.endswith("/000000.png")]
    assert red == sorted([("Who is in this image?", "../../etc/Evil Name"), ("Describe this image.", "A man in a red room.")])
    assert qa_by_file(out / "retain95+tofu") == {"000000.png": [("Describe this image.", "A woman.")]}


def test_split_selection_and_names(tmp_path):
    src = tmp_path / "CLEAR"
    row = {"image": image_cell(picture("red")), "caption": "c", "name": "n"}
    write(src / "forget01" / "train-00000-of-00001.parquet", [row])
    write(src / "retain99" / "train-00000-of-00002.parquet", [row])
    write(src / "retain99" / "train-00001-of-00002.parquet", [row])
    assert {k: len(v) for k, v in find_splits(src).items()} == {"forget01": 1, "retain99": 2}
    summary = convert("clear", src, tmp_path / "out", splits=["retain99"])
    assert list(summary["splits"]) == ["retain99"] and summary["splits"]["retain99"]["pictures"] == 2
    with pytest.raises(UserError, match="no split forget99"):
        convert("clear", src, tmp_path / "out2", splits=["forget99"])
    assert safe_name("../..") == "unnamed" and safe_name("a/b c") == "a_b_c"


def run_error(capsys, argv, *expected):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("fastunlearn: error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_unknown_schema_names_missing_columns(tmp_path, capsys):
    src = tmp_path / "bench"
    write(src / "forget_5" / "train-00000-of-00001.parquet", [{"image": image_cell(picture("red")), "ID": "p1", "text": "x"}])
    err = run_error(capsys, ["convert", "mllmu-bench", str(src), str(tmp_path / "out")], "missing column(s) Generation_Task")
    assert "not an MLLMU-Bench split" in err
    err = run_error(capsys, ["convert", "clear", str(src), str(tmp_path / "out")], "missing column(s) caption")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]


def test_non_empty_out_refused(tmp_path, capsys):
    src = tmp_path / "bench"
    write(src / "forget_5" / "train-00000-of-00001.parquet", [mllmu_row("p1", "red")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_error(capsys, ["convert", "mllmu-bench", str(src), str(out)], "exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()  # an empty folder is fine
    assert main(["convert", "mllmu-bench", str(src), str(out)]) == 0
    assert (out / "forget_5" / "p1" / "qa.jsonl").is_file()


def test_nothing_left_behind_on_failure(tmp_path, capsys):
    """A bad picture in the second split: the first split was already converted, in the temporary
    folder, and none of it may remain."""
    src = tmp_path / "bench"
    write(src / "forget_5" / "train-00000-of-00001.parquet", [mllmu_row("p1", "red"), mllmu_row("p2", "blue")])
    bad = mllmu_row("p3", "green")
    noise = io.BytesIO()
    Image.frombytes("L", (64, 64), random.Random(0).randbytes(64 * 64)).save(noise, format="PNG")
    bad["image"] = image_cell(noise.getvalue()[:-200])  # truncated PNG: the header reads, the pixels do not
    write(src / "retain_95" / "train-00000-of-00001.parquet", [mllmu_row("p4", "red"), bad])
    run_error(capsys, ["convert", "mllmu-bench", str(src), str(tmp_path / "out")], "retain_95", "row 1", "unreadable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]


def test_other_refusals(tmp_path, capsys):
    src = tmp_path / "bench"
    src.mkdir()
    run_error(capsys, ["convert", "clear", str(src), str(tmp_path / "out")], "no parquet files")
    (src / "forget01").mkdir()
    (src / "forget01" / "train-00000-of-00001.parquet").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    run_error(capsys, ["convert", "clear", str(src), str(tmp_path / "out")], "Git LFS pointer")
    write(src / "forget01" / "train-00000-of-00001.parquet",
          [{"image": {"bytes": None, "path": "/etc/passwd"}, "caption": "c", "name": "n"}])
    run_error(capsys, ["convert", "clear", str(src), str(tmp_path / "out")], "not embedded")
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    write(src / "forget01" / "train-00000-of-00001.parquet", [{"image": image_cell(gif.getvalue()), "caption": "c", "name": "n"}])
    run_error(capsys, ["convert", "clear", str(src), str(tmp_path / "out")], "unreadable picture")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]


def test_missing_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    src = tmp_path / "bench"
    write(src / "forget_5" / "train-00000-of-00001.parquet", [mllmu_row("p1", "red")])
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(UserError, match=r"pip install 'fastunlearn\[convert\]'"):
        convert("mllmu-bench", src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]
