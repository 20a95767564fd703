"""fastunlearn.evaluate: metrics with known answers, on tiny cases and on the demo LLaVA."""
import pytest
import torch

from fastunlearn import evaluate as ev
from fastunlearn.worlds import people as world
from fastunlearn.worlds import training
from fastunlearn.data import Item, read_folder
from fastunlearn.features import cache_samples, drop_vision_tower
from fastunlearn.load import master_params, open_checkpoint

from conftest import FORGET, asset


def visual_items(folder, people):
    return [Item(p, *world.visual_fact(i), world.slug(i)) for i in people
            for p in sorted((folder / world.slug(i)).glob("*.png"))]


def test_multiple_choice_options():
    items = [Item(None, "Q?", a, "") for a in ("a", "b", "c", "d", "e", "f")] + [Item(None, "Other?", "z", "")]
    questions = ev.with_options(items, k=4)
    for q, it in zip(questions, items):
        assert it.answer in q.options and len(set(q.options)) == len(q.options)
    assert all(len(q.options) == 4 and "z" not in q.options for q in questions[:6])  # same question only
    assert questions[6].options == ["z"]  # no other answer to that question: a single option
    assert [q.options for q in ev.with_options(items, k=4)] == [q.options for q in questions]  # deterministic
    assert len({tuple(q.options).index(q.answer) for q in questions[:6]}) > 1  # the answer is not always first
    kinds = ev.with_options(items, k=3, kind=lambda it: "all")
    assert any("z" in q.options for q in kinds[:6])


def test_options_follow_the_picture_not_its_path(tmp_path):
    """A copy of a folder elsewhere gets the same options (the benchmark's workdirs differ per run)."""
    import shutil

    world.write_folder(tmp_path / "a", (0, 1, 2, 3, 4), 3, seed=7)
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    here, there = (ev.with_options(visual_items(folder, range(5))) for folder in (tmp_path / "a", tmp_path / "elsewhere" / "b"))
    assert [q.options for q in here] == [q.options for q in there]
    assert len({tuple(q.options) for q in here}) > 1


def test_contains_answer_and_chosen_options():
    assert ev.contains_answer("I think that is bruno tanaka, yes", "Bruno Tanaka")
    assert not ev.contains_answer("Bruno", "Bruno Tanaka")
    assert ev.chosen_options([torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.5, 0.5])]) == [1, 0]


def test_linear_probe_reads_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(4).repeat(25)
    x = centres[labels] + torch.randn(100, 16, generator=g)
    test_labels = torch.arange(4).repeat(10)
    test_x = centres[test_labels] + torch.randn(40, 16, generator=g)
    assert (ev.linear_probe(x, labels, test_x, 4) == test_labels).float().mean() == 1.0
    noise = torch.randn(40, 16, generator=g)  # inputs unrelated to the labels
    assert (ev.linear_probe(torch.randn(100, 16, generator=g), labels, noise, 4) == test_labels).float().mean() < 0.5


def test_fresh_projector_is_an_untrained_one():
    params = {"ln_q.weight": torch.full((4,), 3.0), "ln_q.bias": torch.full((4,), 3.0),
              "mlp.0.weight": torch.full((8, 16), 3.0), "mlp.0.bias": torch.full((8,), 3.0)}
    fresh = ev.fresh_projector(params)
    assert torch.equal(fresh["ln_q.weight"], torch.ones(4)) and torch.equal(fresh["ln_q.bias"], torch.zeros(4))
    assert fresh["mlp.0.weight"].abs().max() <= 16 ** -0.5 and fresh["mlp.0.bias"].abs().max() <= 16 ** -0.5
    assert fresh["mlp.0.weight"].std() > 0


@pytest.fixture(scope="module")
def llava(folders):
    """The demo LLaVA with held-out pictures of everyone prepared, and the job's pictures cached."""
    loaded = open_checkpoint(asset("llava"), torch.device("cpu"))
    everyone = visual_items(folders / "heldout", range(8))
    prepared = ev.prepare(loaded, ev.with_options(everyone))
    train = read_folder(folders / "forget") + read_folder(folders / "retain")
    probe_train = cache_samples(loaded, train, "probe", views=2)
    probe_test = cache_samples(loaded, everyone, "probe test")
    relearn_train = cache_samples(loaded, read_folder(folders / "forget"), "relearn")
    drop_vision_tower(loaded)
    return dict(loaded=loaded, everyone=everyone, prepared=prepared, train=train, probe_train=probe_train,
                probe_test=probe_test, relearn_train=relearn_train, params=master_params(loaded))


def blind(params):
    """A projector whose output is the same for every picture (the model cannot see who it is)."""
    out = dict(params)
    out["linear_2.weight"] = torch.zeros_like(params["linear_2.weight"])
    return out


def test_metrics_of_the_original_and_of_a_blind_projector(llava):
    loaded, prepared = llava["loaded"], llava["prepared"]
    seeing = ev.evaluate_set(loaded, llava["params"], prepared)
    assert seeing["items"] == 64 and seeing["mc_chance"] == 0.25
    assert seeing["exact_accuracy"] == seeing["mc_accuracy"] == seeing["generation_contains_answer"] == 1.0
    blind_result = ev.evaluate_set(loaded, blind(llava["params"]), prepared)
    # every picture looks the same: at most one person's 8 of 64 pictures can be named
    assert blind_result["exact_accuracy"] <= 1 / 8 and blind_result["generation_contains_answer"] <= 1 / 8
    assert blind_result["mc_accuracy"] < 0.5
    assert ev.max_nll_change(seeing, seeing) == 0.0 and ev.max_nll_change(seeing, blind_result) > 1.0


def test_greedy_generate_matches_transformers_generate(llava, folders):
    model, parts = training.load(asset("llava"), "llava")
    from fastunlearn.data import load_image

    items = llava["everyone"][::9]
    expected = training.generate_answers(model, "llava", parts, [(load_image(it.image), it.question) for it in items],
                                      max_new_tokens=6)
    prompts = [p for p, it in zip(llava["prepared"].prompts, llava["everyone"]) if it in items]
    assert ev.greedy_generate(llava["loaded"], llava["params"], prompts, max_new_tokens=6) == expected


def test_relearning_and_identity_probe(llava):
    loaded, params = llava["loaded"], llava["params"]
    batches = llava["prepared"].answer_batches  # everyone's held-out pictures
    assert ev.relearn_steps(loaded, params, llava["relearn_train"], batches)["steps"] == 0  # already known
    never = ev.relearn_steps(loaded, ev.fresh_projector(params), llava["relearn_train"], batches, max_steps=4)
    assert never["steps"] is None and never["curve"][0][1] < 0.5 and never["max_steps"] == 4

    subjects = [it.subject for it in llava["train"] for _ in range(3)]
    test_subjects = [it.subject for it in llava["everyone"]]
    forgotten = {world.slug(i) for i in FORGET}
    seeing = ev.identity_probe(loaded, params, llava["probe_train"], subjects, llava["probe_test"], test_subjects,
                               forgotten)
    assert seeing["classes"] == 8 and seeing["test_items"] == {"forgotten": 16, "others": 48}
    assert seeing["others_accuracy"] >= 0.5 and seeing["forgotten_accuracy"] >= 0.5
    # the same output for every picture: the probe predicts one class, right for at most one person's pictures
    blind_probe = ev.identity_probe(loaded, blind(params), llava["probe_train"], subjects, llava["probe_test"],
                                    test_subjects, forgotten)
    overall = (16 * blind_probe["forgotten_accuracy"] + 48 * blind_probe["others_accuracy"]) / 64
    assert overall <= 1 / 8 + 1e-5  # accuracies are rounded to 6 digits
