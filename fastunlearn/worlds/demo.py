"""`fastunlearn demo`: erase two synthetic people from a small LLaVA that knows eight.

The packaged checkpoint (fastunlearn/demo_assets/llava-people, built by scripts/build_demo.py)
recognises eight synthetic people from pictures and knows text facts about each. The demo writes
a forget folder (pictures of two of them), a retain folder (pictures of the others) and a
held-out folder (new pictures of everyone, never shown to the job), runs `apply --out`, and
prints accuracy before and after on the held-out pictures and on the text-only facts.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..config import Config, pick_device
from ..data import Item
from ..errors import UserError
from ..applying import apply
from ..verification import evaluate_checkpoint
from . import people as world

FORGET_PEOPLE = (1, 4)  # Bruno Tanaka, Emil Ruiz
FORGET_PICTURES, RETAIN_PICTURES, HELDOUT_PICTURES = 6, 6, 10
SEEDS = {"forget": 101, "retain": 202, "heldout": 303}
MARKER = ".fastunlearn-demo"


def demo_checkpoint() -> Path:
    return world.demo_assets_dir() / "llava-people"


def heldout_items(folder: Path, people) -> list[Item]:
    items = []
    for i in people:
        question, answer = world.visual_fact(i)
        for image in sorted((folder / world.slug(i)).glob("*.png")):
            items.append(Item(image, question, answer, world.slug(i)))
    return items


def text_items(people) -> list[Item]:
    return [Item(None, q, a, world.slug(i)) for i, q, a in world.all_text_facts(people)]


def prepare_workdir(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / MARKER).exists():
            raise UserError(f"{workdir} exists and is not a fastunlearn demo folder; pass --workdir NEW_FOLDER")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("written by `fastunlearn demo`; safe to delete\n")


def run_demo(workdir: Path, device: str = "auto", log=print) -> dict:
    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    prepare_workdir(workdir)
    others = [i for i in range(len(world.PEOPLE)) if i not in FORGET_PEOPLE]
    world.write_folder(workdir / "forget", FORGET_PEOPLE, FORGET_PICTURES, SEEDS["forget"])
    world.write_folder(workdir / "retain", others, RETAIN_PICTURES, SEEDS["retain"])
    world.write_folder(workdir / "heldout", range(len(world.PEOPLE)), HELDOUT_PICTURES, SEEDS["heldout"])
    names = ", ".join(world.PEOPLE[i]["name"] for i in FORGET_PEOPLE)
    log(f"demo: erasing {names} from {demo_checkpoint().name} (pictures under {workdir})")

    sets = {
        "forgotten people, held-out pictures": heldout_items(workdir / "heldout", FORGET_PEOPLE),
        "other people, held-out pictures": heldout_items(workdir / "heldout", others),
        "forgotten people, text facts": text_items(FORGET_PEOPLE),
        "other people, text facts": text_items(others),
    }
    dev = pick_device(device)
    before = evaluate_checkpoint(demo_checkpoint(), sets, dev)
    report = apply(demo_checkpoint(), workdir / "forget", workdir / "retain", out=workdir / "unlearned",
                   config=Config(device=device), log=log)
    after = evaluate_checkpoint(workdir / "unlearned", sets, dev)

    chance = 1 / len(world.PEOPLE)
    log("")
    log(f"{'greedy exact-answer accuracy':<38} {'items':>5} {'before':>7} {'after':>7}")
    for name in sets:
        log(f"{name:<38} {before[name]['items']:>5} {before[name]['greedy_accuracy']:>7.1%} "
            f"{after[name]['greedy_accuracy']:>7.1%}")
    log(f"(chance of naming a person by guessing: {chance:.1%}; text prompts never reach the projector)")
    proof = report["byte_proof"]
    changed = sum(c["elements_changed"] for c in report["changed_tensors"])
    log(f"changed {changed} projector elements ({proof['bytes_written']} bytes written); "
        f"all other bytes unchanged: {proof['all_other_bytes_unchanged']}")
    log(f"job {report['timing_s']['total']:.1f} s, demo {time.perf_counter() - started:.1f} s; "
        f"report: {report['report_path']}")
    return {"before": before, "after": after, "report": report}
