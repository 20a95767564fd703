"""The retain term's batches: the retain samples in a seeded random order, so a step sees many people."""
import torch

from fastunlearn.batches import make_batches
from fastunlearn.config import Config
from fastunlearn.data import read_folder
from fastunlearn.job import cache, mixed
from fastunlearn.load import open_checkpoint
from fastunlearn.ranks import ONE_PROCESS
from fastunlearn.worlds import people as world

from conftest import asset


def test_mixed_is_a_seeded_permutation():
    samples = list(range(50))
    order = mixed(samples, 0)
    assert sorted(order) == samples and order != samples
    assert mixed(samples, 0) == order and mixed(samples, 1) != order


def test_a_retain_batch_holds_many_people(tmp_path):
    """In folder order a batch of 8 holds one or two people's views; the job's batches hold three or more of the five, and
    every retain sample once."""
    world.write_folder(tmp_path / "f", (0,), 2, seed=1)
    world.write_folder(tmp_path / "r", (1, 2, 3, 4, 5), 2, seed=2)
    cfg = Config(batch_size=8, views=3, seed=0)
    loaded = open_checkpoint(asset("llava"), torch.device("cpu"))
    forget, retain = read_folder(tmp_path / "f", "forget"), read_folder(tmp_path / "r", "retain")
    sets = cache(loaded, [forget], retain, set(), cfg, ONE_PROCESS)
    samples = sets.samples["retain"]  # in folder order: each item's picture, then its views
    person = {id(s): retain[k // (1 + cfg.views)].subject for k, s in enumerate(samples)}
    people = lambda batch: len({person[id(s)] for s in batch.samples})
    assert max(people(b) for b in make_batches(loaded, samples, cfg.batch_size)) <= 2
    assert min(people(b) for b in sets.train["retain"][:-1]) >= 3
    assert sorted(person[id(s)] for b in sets.train["retain"] for s in b.samples) == sorted(person.values())
