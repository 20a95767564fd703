"""`--other-answers M`: NPO a second time on each forget sequence, against how likely M other people's
answers to the same question are on that picture under the current edit."""
import math
from dataclasses import replace

import pytest
import torch

from fastunlearn.batches import make_batches
from fastunlearn.config import Config
from fastunlearn.data import Item, read_folder
from fastunlearn.features import cache_samples, drop_vision_tower, other_answer_samples
from fastunlearn.forward import score, sequence_nll
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.objectives import forget_loss, npo, retain_nll
from fastunlearn.optimise import other_reference, step_gradients


@pytest.fixture(scope="module")
def job_parts(variant, folders):
    """The demo LLaVA with 3 forget pictures (2 views each) and a text question, their other answers, and
    retain samples."""
    loaded = open_checkpoint(variant("llava"), torch.device("cpu"))
    forget = read_folder(folders / "forget")[:3]
    forget.insert(1, Item(None, "What is the job of Ada?", "baker", ""))  # text-only: no other answers
    retain = read_folder(folders / "retain")
    forget_samples = cache_samples(loaded, forget, "forget", views=1, seed=0)
    retain_samples = cache_samples(loaded, retain[:4], "retain", views=0, seed=0)
    others = other_answer_samples(loaded, forget, forget_samples, 1, forget + retain, 3, seed=0)
    drop_vision_tower(loaded)
    return loaded, forget, forget_samples, retain_samples, others, retain


def test_other_answers_are_the_same_picture_and_question_with_someone_elses_answer(job_parts):
    loaded, forget, samples, _, others, retain = job_parts
    tokenizer = loaded.processor.tokenizer
    pictures = [s for s in samples if s.features is not None]
    assert len(pictures) == 6 and set(others) == {id(s) for s in pictures}  # 3 pictures x 2 views; text: none
    names = {it.answer for it in retain}
    for item, sample in zip([it for it in forget if it.image is not None for _ in range(2)], pictures):
        alternatives = others[id(sample)]
        assert len(alternatives) == 3
        answers = {tokenizer.decode(a.input_ids[a.answer_start:]).strip() for a in alternatives}
        assert len(answers) == 3 and item.answer not in answers and answers <= names
        for a in alternatives:
            assert a.features is sample.features and a.view == sample.view and a.grid == sample.grid
            assert torch.equal(a.input_ids[:a.answer_start], sample.input_ids[:sample.answer_start])  # same prompt
    again = other_answer_samples(loaded, forget, samples, 1, forget + retain, 3, seed=0)
    assert all([a.input_ids.tolist() for a in again[k]] == [a.input_ids.tolist() for a in v] for k, v in others.items())


def test_the_reference_is_the_nll_of_the_other_answers_mean_probability(job_parts):
    loaded, _, samples, _, others, _ = job_parts
    params = master_params(loaded)
    fb = make_batches(loaded, samples, 16)[0]
    ref = other_reference(loaded, params, fb, others, per_pass=4, per_sample=3)
    for k, sample in enumerate(fb.samples):
        if sample.features is None:
            assert ref[k] == math.inf
            continue
        nll = score(loaded, params, make_batches(loaded, others[id(sample)], 8))["nll"].double()
        expected = -torch.log(torch.exp(-nll).mean())
        assert float(ref[k]) == pytest.approx(float(expected), rel=1e-5)


def test_a_step_adds_npo_against_the_other_answers(job_parts):
    """The step's loss and gradient are NPO + NPO against the other answers (beta other_beta, the text
    sequence left out of it) + the retain term, in one pass or several."""
    loaded, _, samples, retain_samples, others, _ = job_parts
    cfg = Config(beta=0.5, other_beta=3.0, retain_weight=3.0, other_answers=3)
    fb, rb = make_batches(loaded, samples, 16)[0], make_batches(loaded, retain_samples, 16)[0]
    params = master_params(loaded)
    fb.ref_nll = score(loaded, params, [fb])["nll"] + 0.3
    other = other_reference(loaded, params, fb, others, per_pass=4, per_sample=3)
    trainable = {n: p.requires_grad_(True) for n, p in params.items()}
    nll = sequence_nll(loaded, trainable, fb)
    has = torch.isfinite(other)
    assert 0 < int(has.sum()) < len(has)
    loss = (forget_loss("npo", nll, fb.ref_nll, fb.lengths, cfg.beta)
            + npo(nll[has], other[has], cfg.other_beta) * (int(has.sum()) / len(has))
            + cfg.retain_weight * retain_nll(sequence_nll(loaded, trainable, rb), rb.lengths))
    expected = torch.autograd.grad(loss, list(trainable.values()))
    for per_pass in (32, 4, 1):
        grads, value = step_gradients(loaded, trainable, fb, rb, cfg, per_pass, other_ref=other)
        assert value == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-6)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6 * float(e.abs().max()))
    for p in trainable.values():
        p.requires_grad_(False)


def test_no_other_answer_in_the_folders_is_said_in_one_line(tmp_path):
    """One forgotten person and no retain folder: no other answer to draw, the job says so and runs."""
    from conftest import asset
    from fastunlearn.job import unlearn
    from fastunlearn.worlds import people as world

    world.write_folder(tmp_path / "forget", (1,), 2, seed=5)
    lines = []
    unlearn(asset("llava"), tmp_path / "forget", None, Config(steps=1, views=0, other_answers=3, holdout=False,
                                                             device="cpu"), log=lines.append)
    notes = [line for line in lines if "--other-answers" in line]
    assert len(notes) == 1 and "no other answer" in notes[0] and "\n" not in notes[0]


def test_the_draw_follows_the_pictures_not_their_paths(job_parts, folders, tmp_path):
    """The same forget folder copied elsewhere trains on the same other answers."""
    import shutil

    loaded, forget, samples, _, others, retain = job_parts
    copy = tmp_path / "copy"
    shutil.copytree(folders / "forget", copy)
    moved = [it if it.image is None else replace(it, image=copy / it.image.relative_to(folders / "forget")) for it in forget]
    again = other_answer_samples(loaded, moved, samples, 1, moved + retain, 3, seed=0)
    drawn = lambda table: [[a.input_ids.tolist() for a in table[id(s)]] for s in samples if id(s) in table]
    assert drawn(again) == drawn(others)
    assert drawn(other_answer_samples(loaded, moved, samples, 1, moved + retain, 3, seed=1)) != drawn(others)
