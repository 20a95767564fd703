"""The synthetic-people world on other families (slow; run with FASTUNLEARN_SLOW=1).

A tiny checkpoint of the family learns the eight people: its LLM and connector are trained on cached
features of 48 training pictures per person (the vision tower stays at its random initialisation,
frozen, which is enough to tell the cartoon faces apart at these families' tiny resolutions; not
at Gemma 3's 8x8 pixels) and on the text facts. Then `apply` erases two people and
the held-out pictures are scored before and after, as tests/test_job.py does for LLaVA and Qwen2-VL."""
import os
import random
import shutil

import pytest
import torch

import tiny_families as tf
from fastunlearn.worlds import people as world
from fastunlearn.data import Item, read_folder
from fastunlearn.batches import _batch
from fastunlearn.config import Config
from fastunlearn.features import cache_samples
from fastunlearn.forward import answer_hidden
from fastunlearn.applying import apply
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.verification import evaluate_checkpoint

from conftest import FORGET, OTHERS

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("FASTUNLEARN_SLOW"), reason="slow: set FASTUNLEARN_SLOW=1")]


def train_world(family, raw, out, folders, steps=600, lr=3e-3, batch_size=32, seed=0):
    """Train the LLM and the connector of a freshly built checkpoint on the world; save it to `out`."""
    torch.manual_seed(seed)
    loaded = open_checkpoint(raw, torch.device("cpu"))
    model = loaded.model
    items = read_folder(folders / "train", "train") + [Item(None, q, a, "") for _, q, a in world.all_text_facts()]
    samples = cache_samples(loaded, items, "train")
    params = {n: p.requires_grad_(True) for n, p in master_params(loaded).items()}
    connector = set(map(id, loaded.adapter.projector_module(model).parameters()))
    vision = getattr(model.model, "vision_tower", None) or getattr(model.model, "visual", None) \
        or getattr(model.model, "vision_model", None)
    frozen = connector | set(map(id, vision.parameters()))
    llm = [p for p in model.parameters() if id(p) not in frozen]
    for p in llm:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([*params.values(), *llm], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = _batch(loaded, rng.sample(samples, min(batch_size, len(samples))))
        logits = answer_hidden(loaded, params, batch) @ model.get_output_embeddings().weight.T  # lm_head trains too
        loss = torch.nn.functional.cross_entropy(logits.float(), batch.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if os.environ.get("FASTUNLEARN_SLOW_LOG") and step % 50 == 0:
            print(f"[{family}] step {step} loss {float(loss):.4f}", flush=True)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in loaded.adapter.projector_module(model).named_parameters():
            p.copy_(params[name])
    out.mkdir()
    model.save_pretrained(out)
    for f in raw.iterdir():
        if not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return float(loss.detach())


# largest accepted fall of the other people's held-out accuracy. Measured (CPU, seed 0), held-out
# exact answers before -> after, forgotten / others / text:
#   llava_next  1.00 -> 0.06 / 0.94 -> 0.79 / 1.00 -> 1.00
#   qwen2_5_vl  0.81 -> 0.06 / 0.83 -> 0.81 / 1.00 -> 1.00
#   idefics3    0.88 -> 0.00 / 0.88 -> 0.67 / 1.00 -> 1.00
# Idefics3's connector is one Linear shared by every picture: the most collateral damage.
OTHERS_DROP = {"llava_next": 0.2, "qwen2_5_vl": 0.2, "idefics3": 0.25}


@pytest.mark.parametrize("family", list(OTHERS_DROP))
def test_world_forgets_held_out_pictures(family, folders, tmp_path):
    world.write_folder(tmp_path / "train", range(8), 48, seed=21)
    raw = tf.build(family, tmp_path / "raw")
    ckpt = tmp_path / "ckpt"
    train_world(family, raw, ckpt, tmp_path)

    sets = {
        "forget": [Item(p, *world.visual_fact(i), world.slug(i)) for i in FORGET
                   for p in sorted((folders / "heldout" / world.slug(i)).glob("*.png"))],
        "others": [Item(p, *world.visual_fact(i), world.slug(i)) for i in OTHERS
                   for p in sorted((folders / "heldout" / world.slug(i)).glob("*.png"))],
        "text": [Item(None, q, a, "") for _, q, a in world.all_text_facts()],
    }
    before = evaluate_checkpoint(ckpt, sets, torch.device("cpu"))
    assert before["forget"]["greedy_accuracy"] >= 0.75, before  # the world was learnt
    report = apply(ckpt, folders / "forget", folders / "retain", out=tmp_path / "out", config=Config())
    assert report["metrics"]["forget"]["after"]["mean_token_nll"] > report["metrics"]["forget"]["before"]["mean_token_nll"]
    after = evaluate_checkpoint(tmp_path / "out", sets, torch.device("cpu"))
    print(family, {k: (before[k]["greedy_accuracy"], after[k]["greedy_accuracy"]) for k in sets})
    assert after["forget"]["greedy_accuracy"] <= 1 / 8 + 1e-9, after
    assert after["others"]["greedy_accuracy"] >= before["others"]["greedy_accuracy"] - OTHERS_DROP[family]
    assert after["text"] == before["text"]
