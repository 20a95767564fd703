"""The clip-recipe world's builder on a tiny population: the contrastive pretraining learns, and the
tower stays frozen while the projector and the LLM are trained on top of it."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastunlearn.worlds import bench as bw
from fastunlearn.worlds import same_bits_on_any_x86
from fastunlearn.worlds import clip_recipe as cr


def test_population_is_disjoint_from_the_named_people_and_captions_name_nobody():
    looks = cr.population()
    named = {bw._look_key(look) for look in cr.named_looks()}
    assert len(looks) >= 1000 and not named & {bw._look_key(look) for look in looks}
    names = {part for w in (bw.bench_world(), bw.lookalike_world()) for p in w.people for part in p["name"].split()}
    assert not names & set(cr.caption_vocabulary())
    batch = cr.pretraining_batch(np.random.default_rng(0), cr.lookalikes(looks[:200]), 32)
    assert len(batch) == len(set(batch)) and 16 <= len(batch) <= 32  # people and their look-alikes, no repeats


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pretraining_lowers_the_loss_and_the_tower_stays_frozen(family):
    torch.set_num_threads(1)
    looks = cr.population(24)
    state, losses, _ = cr.pretrain_tower(family, looks, steps=40, batch=16, lr=3e-3, log=None)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2

    model, parts, stages = cr.build_world(family, bw.bench_world(), state, steps=3, lr=3e-3, projector_steps=3,
                                          n_visual=4, log=None)
    assert len(stages["projector"]) == len(stages["projector+llm"]) == 3
    tower = cr.tower_of(model, family).state_dict()
    kept = [n for n in tower if not n.startswith("merger.")]
    assert all(torch.equal(tower[n], state[n]) for n in kept)  # bit-identical to the pretrained tower
    assert not any(p.requires_grad for p in cr.tower_parameters(model, family))
    fresh, _ = bw.build(family, bw.bench_world(), **{cr.DEPTH_ARG[family]: cr.TOWER_LAYERS})
    trained = dict(model.named_parameters())
    changed = {n for n, p in fresh.named_parameters() if not torch.equal(p, trained[n])}
    assert any("multi_modal_projector" in n or "merger" in n for n in changed)  # the projector moved
    assert any("language_model" in n for n in changed)  # and so did the LLM


def test_world_builders_pin_the_cpu_kernels_before_torch_loads():
    with pytest.raises(RuntimeError, match="before torch is imported"):
        same_bits_on_any_x86()  # torch is loaded here: the pin would do nothing
    if platform.machine() in ("x86_64", "AMD64"):
        probe = ("import os; from fastunlearn.worlds import same_bits_on_any_x86; same_bits_on_any_x86(); "
                 "import torch; print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'], "
                 "os.environ['ONEDNN_MAX_CPU_ISA'])")
        pins = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
        env = {k: v for k, v in os.environ.items() if k not in pins}
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.split()[-3:] == ["AVX2", "AVX2", "AVX2"]
