"""The job's fast paths compute what the plain ones compute (speed itself: benchmarks/bench_e2e.py)."""
from types import SimpleNamespace

import pytest
import torch

from fastunlearn.data import Item, read_folder
from fastunlearn.features import _pixels, cache_samples, drop_vision_tower
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.mask import fisher_diagonal, fisher_diagonal_loop, fisher_samples


def samples_of(family, variant, folders, views=1):
    loaded = open_checkpoint(variant(family), torch.device("cpu"))
    items = read_folder(folders / "forget")[:5] + read_folder(folders / "retain")[:4]
    items.insert(3, Item(None, "What is the job of Ada?", "baker", ""))  # text-only: no projector gradient
    samples = cache_samples(loaded, items, "test", views=views, seed=0)
    drop_vision_tower(loaded)
    return loaded, samples


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batched_fisher_equals_the_per_sample_loop(family, variant, folders):
    loaded, samples = samples_of(family, variant, folders)
    params = master_params(loaded)
    expected = fisher_diagonal_loop(loaded, params, samples, limit=64)
    for chunk in (1, 4, 64):  # ragged chunks, padding, a text-only sample inside a chunk
        got = fisher_diagonal(loaded, params, samples, limit=64, chunk=chunk)
        for name in expected:
            scale = float(expected[name].abs().max())
            assert scale > 0, name
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_the_fisher_covers_every_picture_not_the_first_ones():
    """Samples come picture by picture, each followed by its 4 augmented views; two people, 12
    pictures each. With room for 16, the Fisher takes 16 of the pictures themselves, 8 of each
    person; with room for more, every picture and none of the views."""
    samples = [SimpleNamespace(person=k // 12, picture=k, view=v) for k in range(24) for v in range(5)]
    chosen = fisher_samples(samples, 16)
    assert len(chosen) == len({s.picture for s in chosen}) == 16 and all(s.view == 0 for s in chosen)
    assert sum(s.person == 0 for s in chosen) == sum(s.person == 1 for s in chosen) == 8
    assert fisher_samples(samples, 64) == [s for s in samples if s.view == 0]


def test_llava_features_run_the_tower_only_up_to_the_layer_read(variant, folders):
    loaded = open_checkpoint(variant("llava"), torch.device("cpu"))
    model, image = loaded.model, sorted((folders / "forget").rglob("*.png"))[0]
    pixels = [_pixels(loaded, image, view, seed=0) for view in range(3)]
    calls = []
    last = model.model.vision_tower.encoder.layers[-1]
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = loaded.adapter.vision_features_batch(model, pixels)
    finally:
        handle.remove()
    assert model.config.vision_feature_layer == -2 and not calls  # the last layer never ran
    for features, pixel in zip(got, pixels):  # the full tower's hidden_states[-2], CLS dropped
        full = model.model.vision_tower(pixel["pixel_values"], output_hidden_states=True).hidden_states[-2][0, 1:]
        torch.testing.assert_close(features, full, rtol=1e-5, atol=1e-5)


def test_forget_before_metrics_from_the_reference_pass_equal_a_pass_over_the_pictures(variant, folders):
    from fastunlearn.batches import make_batches
    from fastunlearn.config import Config
    from fastunlearn.forward import score, summarize
    from fastunlearn.job import unlearn

    result = unlearn(variant("llava"), folders / "forget", folders / "retain",
                     Config(steps=1, views=2, batch_size=3, mask="none", device="cpu"), log=print)
    loaded = open_checkpoint(variant("llava"), torch.device("cpu"))
    samples = cache_samples(loaded, result["items"]["forget"], "forget")  # the pictures themselves, view 0
    batches = make_batches(loaded, samples, 5)
    expected = summarize(score(loaded, master_params(loaded), batches), batches)
    got = result["metrics"]["forget"]["before"]
    assert got["items"] == expected["items"] == len(samples) and got["answer_tokens"] == expected["answer_tokens"]
    assert got["mean_token_nll"] == pytest.approx(expected["mean_token_nll"], rel=1e-5)
    assert got["greedy_accuracy"] == expected["greedy_accuracy"]


@pytest.mark.parametrize("method", ["npo", "simnpo", "ga", "graddiff"])
def test_a_step_in_one_or_several_passes_has_the_loss_and_gradient_of_its_two_terms(method, variant, folders):
    from fastunlearn.batches import make_batches
    from fastunlearn.config import Config
    from fastunlearn.forward import score, sequence_nll
    from fastunlearn.objectives import forget_loss, retain_nll, uses_retain
    from fastunlearn.optimise import step_gradients

    loaded, samples = samples_of("llava", variant, folders, views=0)
    cfg = Config(method=method, beta=0.5, retain_weight=3.0)
    fb, rb = make_batches(loaded, samples[:5], 8)[0], make_batches(loaded, samples[5:], 8)[0]
    params = master_params(loaded)
    fb.ref_nll = score(loaded, params, [fb])["nll"] + 0.3  # the reference differs from the current NLL
    rb = rb if uses_retain(method) else None
    trainable = {n: p.requires_grad_(True) for n, p in params.items()}
    loss = forget_loss(method, sequence_nll(loaded, trainable, fb), fb.ref_nll, fb.lengths, cfg.beta)
    if rb is not None:
        loss = loss + cfg.retain_weight * retain_nll(sequence_nll(loaded, trainable, rb), rb.lengths)
    expected = torch.autograd.grad(loss, list(trainable.values()))
    for per_pass in (16, 4, 1):  # one pass; passes mixing forget and retain; one sequence (or text-only) a pass
        grads, value = step_gradients(loaded, trainable, fb, rb, cfg, per_pass)
        assert value == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-6)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6 * float(e.abs().max()))
