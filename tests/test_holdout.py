"""Whole held-out pictures: the split, the choice they make, and the figures the report headlines."""
from pathlib import Path

import pytest

from fastunlearn import holdout
from fastunlearn.config import Config
from fastunlearn.data import Item, read_folder
from fastunlearn.applying import apply
from fastunlearn.worlds import people as world

from conftest import FORGET


def items_of(pictures_per_subject: dict) -> list[Item]:
    return [Item(Path(f"{s}/{k}.png"), q, f"{s}-{q}", s) for s, n in pictures_per_subject.items()
            for k in range(n) for q in ("who", "job")]


def test_split_holds_out_one_whole_picture_per_subject_with_two_or_more():
    items = items_of({"a": 3, "b": 2, "c": 1}) + [Item(None, "text", "fact", "a")]
    train, held, thin = holdout.split(items, seed=0)
    assert thin == ["c"]
    assert {it.subject for it in held} == {"a", "b"}
    for s in ("a", "b"):
        pictures = {it.image for it in held if it.subject == s}
        assert len(pictures) == 1  # one picture, with every question asked of it
        assert sum(1 for it in held if it.subject == s) == 2
        assert not pictures & {it.image for it in train}
    assert Item(None, "text", "fact", "a") in train
    assert sorted(map(str, (it.image for it in train + held if it.image))) == sorted(str(it.image) for it in items if it.image)
    assert holdout.split(items, seed=0) == (train, held, thin)  # seeded
    assert any(holdout.split(items, seed=s)[1] != held for s in range(1, 10))


def test_candidates_and_rank():
    cfg = Config(search=True)
    given, anchored, gentler = holdout.candidates(cfg)
    assert given is cfg and (gentler.lr, gentler.mask, gentler.retain_weight, gentler.steps) == (1e-3, "none", 5.0, 120)
    assert anchored == Config(search=True, anchor_weight=holdout.ANCHORED)
    assert len(holdout.candidates(Config(search=True, anchor_weight=1.0))) == 2  # already anchored
    assert holdout.candidates(Config()) == [Config()]
    chance = 0.125
    at_chance_small_drop_far = holdout.rank_key(0.15, chance, 0.02, 9.0)
    at_chance_small_drop_near = holdout.rank_key(0.0, chance, 0.02, 3.0)
    at_chance_big_drop = holdout.rank_key(0.0, chance, 0.10, 12.0)
    not_forgotten = holdout.rank_key(0.5, chance, 0.0, 1.0)
    less_remembered = holdout.rank_key(0.3, chance, 0.5, 1.0)
    assert sorted([not_forgotten, at_chance_big_drop, less_remembered, at_chance_small_drop_near,
                   at_chance_small_drop_far]) == \
        [at_chance_small_drop_far, at_chance_small_drop_near, at_chance_big_drop, less_remembered, not_forgotten]


def test_held_out_pictures_choose_the_step_and_settings_when_asked(variant, folders):
    notes = []
    report = apply(variant("llava"), folders / "forget", folders / "retain", dry_run=True,
                   config=Config(steps=10, views=0, fisher_samples=8, select=True, search=True), log=notes.append)
    held, sel = report["heldout"], report["selection"]
    assert held["pictures"] == {"forget": len(FORGET), "retain": 6} and held["thin_subjects"] == {"forget": 0, "retain": 0}
    assert len(sel["settings"]) == 3
    assert len(sel["trace"]) == 10 + 10 + 12  # every step of the three settings
    curves = [[t["forget_nll"] for t in sel["trace"] if t["setting"] == k] for k in range(3)]
    assert curves[0] != curves[1]  # the anchored setting runs with its anchors
    before = held["retain"]["before"]
    keys = [holdout.rank_key(t["forget_accuracy"], report["check"]["chance"],
                             before["greedy_accuracy"] - t["retain_accuracy"], t["forget_nll"]) for t in sel["trace"]]
    best = sel["trace"][keys.index(min(keys))]
    assert (best["setting"], best["step"]) == (sel["chosen"], sel["step"])
    # the headline figures are the chosen first-run projector's on the held-out pictures (fp32: exact)
    assert held["forget"]["after"]["greedy_accuracy"] == best["forget_accuracy"]
    assert held["retain"]["after"]["greedy_accuracy"] == best["retain_accuracy"]
    assert len(report["loss_curve"]) == sel["step"]  # the last run: the chosen setting, for the chosen steps
    assert any(n.startswith("held-out pictures chose") for n in notes)
    assert report["check"]["on"] == {"forget": "held-out pictures", "retain": "held-out pictures"}
    # the written projector trained on every picture, and its metrics cover every picture
    assert report["metrics"]["forget"]["before"]["items"] == len(read_folder(folders / "forget"))


def test_by_default_held_out_pictures_measure_a_first_run_and_the_last_trains_on_everything(variant, folders):
    cfg = Config(steps=3, views=0, fisher_samples=8)
    report = apply(variant("llava"), folders / "forget", folders / "retain", dry_run=True, config=cfg)
    sel = report["selection"]
    assert len(sel["settings"]) == 1 and (sel["chosen"], sel["step"]) == (0, 3)
    assert [t["step"] for t in sel["trace"]] == [3]  # scored once, at its end
    assert report["heldout"]["forget"]["after"]["greedy_accuracy"] == sel["trace"][0]["forget_accuracy"]
    assert len(report["loss_curve"]) == 3
    # the last run is the job without hold-out: the same delta, bit for bit
    plain = apply(variant("llava"), folders / "forget", folders / "retain", dry_run=True,
                  config=Config(steps=3, views=0, fisher_samples=8, holdout=False))
    assert "forget" not in plain["heldout"] and plain["selection"]["trace"] == []
    assert report["reproduce"]["delta_sha256"] == plain["reproduce"]["delta_sha256"]
    assert report["metrics"] == plain["metrics"]
    # and the first run, which did not train on the held-out pictures, is another projector
    assert report["heldout"]["retain"]["after"] != report["heldout"]["retain"]["before"]


def test_thin_folders_say_so_and_train_on_everything(variant, tmp_path):
    world.write_folder(tmp_path / "forget", FORGET, 1, seed=3)
    world.write_folder(tmp_path / "retain", (0, 2), 1, seed=4)
    notes = []
    report = apply(variant("llava"), tmp_path / "forget", tmp_path / "retain", dry_run=True,
                   config=Config(steps=2, views=0, fisher_samples=4), log=notes.append)
    assert report["heldout"]["pictures"] == {"forget": 0, "retain": 0}
    assert report["heldout"]["thin_subjects"] == {"forget": len(FORGET), "retain": 2}
    assert "forget" not in report["heldout"] and report["selection"]["trace"] == []
    assert any(n.startswith("note: 2 forget subject(s) have one picture") for n in notes), notes
    assert any(n.startswith("note: no picture held out") for n in notes), notes
    assert report["check"]["on"]["forget"] == "unseen views"
    assert len(report["loss_curve"]) == 2


@pytest.mark.parametrize("flag", ["--no-holdout", "--search"])
def test_cli_flags(flag, variant, folders, capsys):
    from fastunlearn.cli import main

    assert main(["apply", str(variant("llava")), str(folders / "forget"), "--retain", str(folders / "retain"),
                 "--dry-run", "--steps", "2", "--views", "0", flag]) == 0
    out = capsys.readouterr().out
    if flag == "--no-holdout":
        assert "held-out pictures" not in out.split("changed")[0] and "forget, training pictures" in out
    else:
        assert "forget, held-out pictures" in out.split("changed")[0]
