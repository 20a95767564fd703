"""Issue 12: the same `apply` under torchrun (gloo, 2 CPU processes), several erasure requests in one
job, and a rank that dies or disagrees. Each torchrun run is a subprocess with a hard timeout, and
collectives time out after FASTUNLEARN_DIST_TIMEOUT_S, so a hung collective cannot hang the suite."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fastunlearn.cli import main
from fastunlearn.config import Config
from fastunlearn.applying import apply
from fastunlearn.worlds import people as world

from conftest import FORGET, OTHERS, tree
from test_job import assert_only_projector_bytes_changed, file_bytes

# few steps, no augmented views: each run takes seconds; the same options for both launch modes
STEPS, BATCH = 40, 4
OPTIONS = ["--steps", str(STEPS), "--views", "0", "--batch-size", str(BATCH), "--seed", "0", "--device", "cpu"]
CONFIG = dict(steps=STEPS, views=0, batch_size=BATCH, seed=0, device="cpu")
# The reduction order differs (each rank sums its share, then the all-reduce), so the projector
# matches the single-process one to float32 rounding, amplified a little by 40 AdamW steps:
TOLERANCE = 1e-4  # max |difference| of any projector element (the elements are O(0.1))
TIMEOUT = 240
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FASTUNLEARN_DIST_TIMEOUT_S": "60",
       "TOKENIZERS_PARALLELISM": "false"}


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "FASTUNLEARN_TEST_DIE")}
    return {**e, **ENV, **extra}


def torchrun(argv, tmp_path, name, **extra):
    """`torchrun --standalone --nproc-per-node 2 -m fastunlearn ARGV`; each rank's stdout and stderr
    land in LOGS/<name>/.../<rank>/std{out,err}.log. Returns (returncode, {rank: stderr text}, stdout)."""
    logs = tmp_path / f"logs-{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(logs), "--redirects", "3", "-m", "fastunlearn", *map(str, argv)]
    p = subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=TIMEOUT,
                       cwd=Path(__file__).parent.parent)
    err = {int(f.parent.name): f.read_text() for f in logs.rglob("stderr.log")}
    out = {int(f.parent.name): f.read_text() for f in logs.rglob("stdout.log")}
    return p.returncode, err, out, p.stderr


def projector(folder):
    out = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if "multi_modal_projector." in k:
                out[k] = f.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """Two erasure requests (one person each) and a retain folder."""
    root = tmp_path_factory.mktemp("requests")
    world.write_folder(root / "forget-a", FORGET[:1], 3, seed=21)
    world.write_folder(root / "forget-b", FORGET[1:], 3, seed=22)
    world.write_folder(root / "retain", OTHERS, 2, seed=23)
    return root


@pytest.fixture(scope="module")
def single(variant, requests, tmp_path_factory):
    """The single-process job on the same inputs: the reference."""
    out = tmp_path_factory.mktemp("single") / "out"
    report = apply(variant("llava"), [requests / "forget-a", requests / "forget-b"], requests / "retain", out=out,
                   config=Config(**CONFIG))
    return out, report


def test_plain_run_has_no_process_group(single):
    _, report = single
    assert report["distributed"] == {"world_size": 1, "backend": None, "launcher": None,
                                     "projector_identical_on_all_ranks": None}
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


@pytest.mark.parametrize("llm", ["replicated", "sharded"])
def test_torchrun_two_ranks_match_one_process(llm, variant, requests, single, tmp_path):
    """Data parallel over 2 gloo ranks, the frozen LLM replicated on each or FSDP2-sharded over them."""
    src = variant("llava")
    before = file_bytes(src)
    out = tmp_path / "out"
    rc, err, stdout, launcher_err = torchrun(["apply", src, requests / "forget-a", requests / "forget-b", "--retain",
                                              requests / "retain", "--out", out, *OPTIONS,
                                              *(["--shard-llm"] if llm == "sharded" else [])], tmp_path, "ok")
    assert rc == 0, (err, launcher_err)
    assert file_bytes(src) == before
    assert "written:" in stdout[0] and stdout[1] == ""  # rank 0 alone reports; rank 1 prints nothing
    report = json.loads((out / "unlearning_report.json").read_text())
    after = file_bytes(out)
    after.pop("unlearning_report.json")
    assert_only_projector_bytes_changed(before, after, report)
    d = report["distributed"]
    assert (d["world_size"], d["backend"], d["projector_identical_on_all_ranks"]) == (2, "gloo", True)
    assert d["llm"].startswith(llm)
    if llm == "sharded":  # rank 0 holds half of the decoder layers' bytes
        assert d["decoder_layer_bytes_held_by_rank_0"] == d["decoder_layer_bytes"] // 2

    ref_out, ref = single
    ours, theirs = projector(out), projector(ref_out)
    diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    print(f"max |projector difference| torchrun x2 vs one process: {diff:.3g}")
    assert diff <= TOLERANCE
    # same data, same metrics (scores are per-sequence; float rounding only)
    for part in ("forget", "retain"):
        for when in ("before", "after"):
            a, b = report["metrics"][part][when], ref["metrics"][part][when]
            assert a["items"] == b["items"] and a["greedy_accuracy"] == b["greedy_accuracy"]
            assert abs(a["mean_token_nll"] - b["mean_token_nll"]) < 1e-3
    # several requests in one job: per-request metrics, by hash, each request's person forgotten
    assert len(report["requests"]) == 2
    for r, folder in zip(report["requests"], ("forget-a", "forget-b")):
        assert folder not in json.dumps(r) and len(r["folder_sha256"]) == 64
        m = r["metrics"]["forget"]
        assert m["before"]["greedy_accuracy"] == 1.0 and m["after"]["greedy_accuracy"] == 0.0, m
    assert sum(r["metrics"]["forget"]["before"]["items"] for r in report["requests"]) == \
        report["metrics"]["forget"]["before"]["items"]
    assert main(["verify", str(src), str(out), str(requests / "forget-a"), "--retain", str(requests / "retain"),
                 "--no-probes", "--max-forget-accuracy", "0.0"]) == 0


def test_other_answers_on_a_sharded_llm_match_one_process(variant, requests, tmp_path):
    """--other-answers runs the other answers through the LLM with no gradient, each rank its own pictures':
    with a sharded LLM and batches of 3 pictures split 2 + 1 (a step's other answers: 6 on one rank, 3 on the
    other), the projector is the single process's."""
    src, extra = variant("llava"), ["--other-answers", "3", "--batch-size", "3"]
    folders = [requests / "forget-a", requests / "forget-b"]
    ref_out = tmp_path / "single"
    apply(src, folders, requests / "retain", out=ref_out, config=Config(**{**CONFIG, "batch_size": 3}, other_answers=3))
    out = tmp_path / "out"
    rc, err, _, launcher_err = torchrun(["apply", src, *folders, "--retain", requests / "retain", "--out", out,
                                         *OPTIONS, *extra, "--shard-llm"], tmp_path, "other")
    assert rc == 0, (err, launcher_err)
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["config"]["other_answers"] == 3 and report["distributed"]["projector_identical_on_all_ranks"]
    ours, theirs = projector(out), projector(ref_out)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= TOLERANCE
    assert any(not torch.equal(ours[k], plain) for k, plain in projector(src).items())


@pytest.mark.parametrize("how", ["killed", "raises"])
def test_rank_failing_mid_job_writes_nothing_and_a_rerun_works(how, variant, fresh, requests, tmp_path):
    """Rank 1 is SIGKILLed (or raises) as optimisation starts, in an in-place job: every rank stops
    with one line, the checkpoint is untouched, no journal is left; the same command then works."""
    ckpt = fresh(variant("llava"))
    before = tree(ckpt)
    argv = ["apply", ckpt, requests / "forget-a", "--retain", requests / "retain", "--mask", "none", *OPTIONS[2:],
            "--steps", "4"]
    die = "1:optimise" if how == "killed" else "1:optimise:raise"
    rc, err, _, launcher_err = torchrun(argv, tmp_path, how, FASTUNLEARN_TEST_DIE=die)
    assert rc != 0
    assert tree(ckpt) == before  # untouched, and no journal (or anything else) left in it
    lines = err[0].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastunlearn: error: rank 0: "), err[0]
    assert "nothing was written" in lines[0]
    if how == "raises":  # the rank that raised says why, in one line
        lines = err[1].strip().splitlines()
        assert len(lines) == 1 and "rank 1: RuntimeError: injected failure" in lines[0], err[1]
        return

    rc, err, _, launcher_err = torchrun(argv, tmp_path, "rerun")
    assert rc == 0, (err, launcher_err)
    report = json.loads((ckpt / "unlearning_report.json").read_text())
    assert report["checkpoint"]["in_place"] and report["distributed"]["world_size"] == 2
    assert report["reproduce"]["command"].startswith("torchrun --nproc-per-node 2 -m fastunlearn apply")
    assert {c["file"] for c in report["changed_tensors"]} == {"model.safetensors"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args, extra=()):
    """Two ranks started by hand (torchrun's environment, each its own CKPT and FORGET_DIR)."""
    port = str(_free_port())
    procs = []
    for r, (ckpt, forget) in enumerate(args):
        e = env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "fastunlearn", "apply", str(ckpt), str(forget), *OPTIONS,
                                       *extra], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p, *p.communicate(timeout=TIMEOUT)) for p in procs]


@pytest.mark.parametrize("differs", ["checkpoint", "forget"])
def test_mismatched_inputs_across_ranks_stop_before_any_work(differs, variant, fresh, requests, tmp_path):
    """Rank 1's checkpoint differs by one byte of a frozen LLM tensor, or its forget folder is another
    one. Both ranks stop before loading a model, with one line naming what differs; nothing is written."""
    a, b = fresh(variant("llava"), "a"), fresh(variant("llava"), "b")
    if differs == "checkpoint":
        data = bytearray((b / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (b / "model.safetensors").write_bytes(bytes(data))
        args = [(a, requests / "forget-a"), (b, requests / "forget-a")]
    else:
        args = [(a, requests / "forget-a"), (a, requests / "forget-b")]
    before = {p: tree(p) for p in (a, b)}
    for p, out, err in start_ranks(args):
        assert p.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"rank 1's inputs differ from rank 0's ({differs})" in lines[0], err
    assert {p: tree(p) for p in (a, b)} == before


def test_rank_0_cannot_start_so_no_rank_starts(variant, fresh, requests):
    """Another job holds the checkpoint's lock: rank 0 says busy, rank 1 stops with the same status
    instead of starting the work alone."""
    from fastunlearn import journal

    ckpt = fresh(variant("llava"))
    before = tree(ckpt)
    with journal.locked(ckpt):
        results = start_ranks([(ckpt, requests / "forget-a")] * 2)
    for r, (p, out, err) in enumerate(results):
        assert p.returncode == 7, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "checkpoint is busy" in lines[0], err
        assert r == 0 or "rank 1: rank 0 cannot start" in lines[0]
    assert tree(ckpt) == before


def test_several_requests_one_process_with_a_manifest(variant, requests, tmp_path, capsys):
    manifest = tmp_path / "requests.txt"
    manifest.write_text(f"# two people\n{requests / 'forget-a'}\n\n{requests / 'forget-b'}\n")
    report_path = tmp_path / "r.json"
    assert main(["apply", str(variant("llava")), str(manifest), "--retain", str(requests / "retain"), "--dry-run",
                 "--report", str(report_path), *OPTIONS]) == 0
    out = capsys.readouterr().out
    assert "request 1" in out and "request 2" in out
    report = json.loads(report_path.read_text())
    assert [r["metrics"]["forget"]["after"]["greedy_accuracy"] for r in report["requests"]] == [0.0, 0.0]
    assert len(report["data"]["forget"]["folder_sha256"]) == 2
