"""The job's fast paths compute what the plain ones compute (speed itself: benchmarks/bench_e2e.py)."""
import pytest
import torch

from fastunlearn.data import Item, read_folder
from fastunlearn.features import cache_samples, drop_vision_tower
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.mask import fisher_diagonal, fisher_diagonal_loop


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


@pytest.mark.parametrize("method", ["npo", "simnpo", "graddiff"])
def test_micro_batched_steps_make_the_same_update(method, variant, folders):
    from fastunlearn.batches import make_batches, make_groups
    from fastunlearn.config import Config
    from fastunlearn.forward import score
    from fastunlearn.optimise import optimise

    loaded, samples = samples_of("llava", variant, folders, views=0)
    forget, retain = samples[:6], samples[6:]
    cfg = Config(steps=3, method=method, batch_size=4)
    results = []
    for split in (False, True):
        params = master_params(loaded)
        fb = make_groups(loaded, forget, 4, 3) if split else make_batches(loaded, forget, 4)
        rb = make_groups(loaded, retain, 4, 3) if split else make_batches(loaded, retain, 4)
        flat = [b for g in fb for b in g] if split else fb
        ref = score(loaded, params, flat)["nll"]
        for b, r in zip(flat, ref.split([len(b.lengths) for b in flat])):
            b.ref_nll = r
        mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
        losses = optimise(loaded, params, mask, fb, rb, cfg, print)
        results.append((losses, params))
    (l0, p0), (l1, p1) = results
    assert l0 == pytest.approx(l1, rel=1e-5)
    for n in p0:
        torch.testing.assert_close(p1[n], p0[n], rtol=1e-4, atol=1e-5)  # Adam amplifies fp32 noise in near-zero gradients
