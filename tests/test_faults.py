"""Faults: SIGKILL at random moments, failing writes, two jobs at once, a checkpoint changed under
the job, a read-only source.

The kill trials run the real command line (`fastunlearn.cli.main`, what `python -m fastunlearn`
runs) in processes forked from one pre-imported server process: importing torch and transformers
takes ~1.7 s per process here, forking takes milliseconds, so 50+ trials fit in the CI budget.
Deterministic kills inside the write use the inert-by-default hook FASTUNLEARN_TEST_PAUSE_AT
(fastunlearn.journal.test_pause). A longer soak: FASTUNLEARN_KILL_TRIALS=500 pytest tests/test_faults.py.
"""
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from fastunlearn import journal
from fastunlearn import safetensors_io as st
from fastunlearn.worlds import people as world
from fastunlearn.errors import UserError
from fastunlearn.write import write_result

from conftest import FORGET, tree

SERVER = r"""
import json, os, sys, traceback
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import fastunlearn.cli, fastunlearn.applying, fastunlearn.job, fastunlearn.patching, fastunlearn.report  # import once, fork per run
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from fastunlearn.cli import main, quiet_transformers
quiet_transformers()
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        _, status = os.waitpid(req["wait"], 0)
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        os.environ.update(req.get("env", {}))
        try:
            code = main(req["argv"])
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc(); code = 99
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code or 0)
    print(pid, flush=True)
"""


class Runner:
    """Starts CLI runs (forked from the server); kill and wait by pid."""

    def __init__(self, logdir: Path):
        self.logdir, self.n = logdir, 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=Path(__file__).parent.parent)
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, argv, env=None):
        self.n += 1
        log = self.logdir / f"run-{self.n}.log"
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "env": env or {}, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline()), log

    def wait(self, pid):
        self.proc.stdin.write(json.dumps({"wait": pid}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def run(self, argv, env=None):
        pid, log = self.start(argv, env)
        return self.wait(pid), log.read_text()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def wait_for(log: Path, text: str, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.005)
    raise AssertionError(f"{text!r} not in {log}: {log.read_text() if log.exists() else ''}")


def hashes(folder: Path, names) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


APPLY = ["--steps", "2", "--views", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("logs"))
    yield r
    r.close()


@pytest.fixture(scope="module")
def forget(tmp_path_factory):
    root = tmp_path_factory.mktemp("forget")
    world.write_folder(root, FORGET, 1, seed=3)
    return root


@pytest.fixture(scope="module")
def references(variant, runner, forget, tmp_path_factory):
    """Per variant: the pristine folder, its files, their old and new sha256 and the delta, from one
    complete apply (all features sent to disk: the spill path must give the same bytes)."""
    refs = {}
    for key in [("fp16-single", torch.float16, False), ("bf16-sharded", torch.bfloat16, True)]:
        src = variant("llava", key[1], key[2])
        work = tmp_path_factory.mktemp(key[0])
        ckpt = Path(shutil.copytree(src, work / "ckpt"))
        files = sorted(p.name for p in src.iterdir() if p.is_file())
        status, out = runner.run(["apply", ckpt, forget, *APPLY, "--delta", work / "delta.safetensors"],
                                 env={"FASTUNLEARN_FEATURE_MEMORY_MB": "0"})
        assert status["code"] == 0, out
        refs[key[0]] = dict(src=src, files=files, old=hashes(src, files), new=hashes(ckpt, files),
                            delta=work / "delta.safetensors")
        assert refs[key[0]]["old"] != refs[key[0]]["new"]
    return refs


def state(folder, ref):
    """'old' or 'new' when every file's sha256 is that of one version, else the mismatch."""
    now = hashes(folder, ref["files"])
    for name in ("old", "new"):
        if now == ref[name]:
            return name
    return {n: (ref["old"][n] == h, ref["new"][n] == h) for n, h in now.items()}


def test_sigkill_apply_and_patch_leave_old_or_new(runner, references, forget, tmp_path):
    """Kill `apply` and `patch` at random moments (seeded) and inside each write phase; after each,
    what the next command finds (recover, then the files) is wholly old or wholly new, and a re-run
    completes to the new checkpoint."""
    rng = random.Random(1234)
    fp16, bf16 = references
    trials = []  # (command, variant, how to kill)
    for v in references:
        trials += [("patch", v, ("pause", p)) for p in ("journal", "committed", "mid-write", "written")]
    trials += [("apply", fp16, ("pause", "before-write")), ("apply", fp16, ("pause", "mid-write")),
               ("apply", bf16, ("pause", "committed")), ("apply", bf16, ("random", rng.uniform(0.0, 4.0)))]
    # random moments over a whole patch run, measured unkilled first (fork to exit)
    durations = {}
    for v, ref in references.items():
        ckpt = Path(shutil.copytree(ref["src"], tmp_path / f"timing-{v}"))
        t = time.monotonic()
        assert runner.run(["patch", ckpt, ref["delta"]])[0]["code"] == 0
        durations[v] = time.monotonic() - t
    n_random_patch = int(os.environ.get("FASTUNLEARN_KILL_TRIALS", "60")) - len(trials)
    for _ in range(n_random_patch):
        v = rng.choice(list(references))
        trials.append(("patch", v, ("random", rng.uniform(0.0, 0.9 * durations[v]))))
    outcomes = Counter()
    for i, (command, v, (how, arg)) in enumerate(trials):
        ref = references[v]
        ckpt = Path(shutil.copytree(ref["src"], tmp_path / f"t{i}"))
        argv = ["patch", ckpt, ref["delta"]] if command == "patch" else ["apply", ckpt, forget, *APPLY]
        env = {"FASTUNLEARN_TEST_PAUSE_AT": arg} if how == "pause" else {}
        pid, log = runner.start(argv, env)
        if how == "pause":
            wait_for(log, f"paused at {arg}")
        else:
            time.sleep(arg)
        os.kill(pid, signal.SIGKILL)  # the child is not reaped before `wait`: this pid is still ours
        status = runner.wait(pid)
        killed = status["signal"] == signal.SIGKILL
        assert killed or status["code"] == 0, log.read_text()
        journal_state = "committed journal" if (ckpt / journal.JOURNAL).exists() else \
            "uncommitted journal" if (ckpt / (journal.JOURNAL + ".tmp")).exists() else "no journal"

        # the next fastunlearn command first runs recover(), then finds the files wholly old or new
        journal.recover(ckpt)
        found = state(ckpt, ref)
        assert found in ("old", "new"), (trials[i], found)
        if command == "apply" and found == "old":  # the re-run of apply completes, to the same bytes
            rerun, out = runner.run(["apply", ckpt, forget, *APPLY])
            assert rerun["code"] == 0, out
        else:  # the re-run of the patch completes (or finds it done)
            rerun, out = runner.run(["patch", ckpt, ref["delta"]])
            assert rerun["code"] == 0 and ("already patched" in out) == (found == "new"), out
        assert state(ckpt, ref) == "new", (trials[i], state(ckpt, ref))
        assert not (ckpt / journal.JOURNAL).exists() and not (ckpt / (journal.JOURNAL + ".tmp")).exists()
        outcomes[(command, how, "killed" if killed else "finished first", journal_state, f"found {found}")] += 1
        shutil.rmtree(ckpt)
    print(f"\nkill trials: {len(trials)} (unkilled patch runs took {durations} s)")
    for key, n in sorted(outcomes.items()):
        print(f"  {n:3d}  {' / '.join(key)}")
    assert len(trials) >= 50
    assert any(k[2] == "killed" and k[3] == "committed journal" for k in outcomes)  # killed mid-write and replayed


def test_two_jobs_at_once_one_says_busy(runner, references, forget, tmp_path):
    ref = references["fp16-single"]
    ckpt = Path(shutil.copytree(ref["src"], tmp_path / "ckpt"))
    first, first_log = runner.start(["apply", ckpt, forget, *APPLY], env={"FASTUNLEARN_TEST_PAUSE_AT": "before-write:5"})
    wait_for(first_log, "paused at before-write")  # the first job holds the checkpoint, its write is due
    second, out = runner.run(["apply", ckpt, forget, *APPLY])
    third, out3 = runner.run(["patch", ckpt, ref["delta"]])
    assert state(ckpt, ref) == "old"  # neither wrote while the first holds it
    assert runner.wait(first)["code"] == 0, first_log.read_text()
    for status, text in ((second, out), (third, out3)):
        assert status["code"] == 7 and "checkpoint is busy" in text, text
    assert state(ckpt, ref) == "new"  # exactly the first job's bytes: nothing interleaved


# ---------------------------------------------------------------- failing writes (in process, injected)


def fake_result(ckpt: Path, scale=2.0) -> dict:
    """A projector change as the job would produce it (write_result reads only `changes`)."""
    stored = st.read_checkpoint(ckpt)
    changes = []
    for name in ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"):
        info = stored[name]
        old = st.read_bytes(info)
        new = st.tensor_to_bytes(st.bytes_to_tensor(old, info.dtype, info.shape) * scale + 1)
        changes.append({"name": name, "file": info.file.name, "byte_range": [info.start, info.end],
                        "before_sha256": st.sha256_bytes(old), "after_sha256": st.sha256_bytes(new), "data": new})
    return {"changes": changes}


def stamps(ckpt):
    return {p.resolve(): st.file_stamp(p) for p in st.weight_files(ckpt)}


@pytest.fixture
def small(variant, fresh):
    return fresh(variant("llava", torch.bfloat16, True))


def failing_write(monkeypatch, fail_calls):
    """_write_at writes half its bytes then raises EIO on the given call numbers (1-based)."""
    real, calls = journal._write_at, [0]

    def write_at(f, offset, data):
        calls[0] += 1
        if calls[0] in fail_calls:
            real(f, offset, data[: len(data) // 2])
            raise OSError(errno.EIO, "Input/output error")
        real(f, offset, data)

    monkeypatch.setattr(journal, "_write_at", write_at)


def test_disk_full_writing_the_journal_changes_nothing(small, monkeypatch):
    before = tree(small)
    result = fake_result(small)
    real_encode = journal._encode_journal

    def full(writes):
        real_encode(writes)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal, "_encode_journal", full)
    with pytest.raises(UserError, match=r"cannot write the patch journal \(the disk is full\); the checkpoint is unchanged"):
        write_result(small, result, None, False, stamps(small))
    assert tree(small) == before  # no journal left either


def test_io_error_mid_write_is_rolled_back(small, monkeypatch):
    before = tree(small)
    failing_write(monkeypatch, {2})  # the second range fails half-written, after the commit point
    with pytest.raises(UserError, match="writing the patch failed .*old bytes were put back, the checkpoint is unchanged"):
        write_result(small, fake_result(small), None, False, stamps(small))
    assert tree(small) == before


def test_io_error_and_failed_undo_leave_a_journal_that_finishes(small, monkeypatch):
    before = tree(small)
    result = fake_result(small)
    failing_write(monkeypatch, {2, 3})  # the write fails, and so does the undo
    with pytest.raises(UserError, match="mid-patch, kept consistent by .fastunlearn-journal"):
        write_result(small, result, None, False, stamps(small))
    assert (small / journal.JOURNAL).exists()
    monkeypatch.undo()  # the disk works again: the next command finishes the patch
    assert journal.recover(small) is True
    expected = {name: bytearray(data) for name, data in before.items()}
    for c in result["changes"]:
        lo, hi = c["byte_range"]
        expected[c["file"]][lo:hi] = c["data"]
    assert tree(small) == {name: bytes(data) for name, data in expected.items()}  # wholly new


def test_failed_out_leaves_no_folder(small, monkeypatch, tmp_path):
    before = tree(small)
    out = tmp_path / "out"

    def full(root):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal, "fsync_tree", full)
    with pytest.raises(UserError, match=r"--out .*writing the new checkpoint failed \(the disk is full\); nothing was written"):
        write_result(small, fake_result(small), out, False, stamps(small))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert tree(small) == before

    def partial_copy(src, dst, **kw):
        Path(dst).mkdir()
        (Path(dst) / "config.json").write_text("{}")
        raise shutil.Error([("model.safetensors", str(dst), "No space left on device")])

    monkeypatch.setattr(journal.shutil, "copytree", partial_copy)
    with pytest.raises(UserError, match="cannot copy the checkpoint .*nothing was written"):
        write_result(small, fake_result(small), out, False, stamps(small))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_projector_rewritten_with_same_stamp_is_detected(small):
    """Another tool rewrote the projector bytes in place and restored size and mtime: the file stamp
    cannot see it, the sha256 check of the bytes to replace does; nothing is written."""
    result = fake_result(small)
    marks = stamps(small)
    c = result["changes"][0]
    path = small / c["file"]
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(c["byte_range"][0])
        f.write(b"\x00\x01\x02\x03")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stamps(small) == marks
    before = tree(small)
    with pytest.raises(UserError, match="changed on disk while the job ran; nothing was written"):
        write_result(small, result, None, False, marks)
    assert tree(small) == before


def test_source_changed_while_copying_to_out(small, monkeypatch, tmp_path):
    result, marks = fake_result(small), stamps(small)
    real = journal.copy_checkpoint

    def copy_then_rewrite(src, dst):
        tmp = real(src, dst)
        shard = st.weight_files(small)[0]
        shard.write_bytes(shard.read_bytes())  # another tool rewrote a shard during the copy
        return tmp

    monkeypatch.setattr(journal, "copy_checkpoint", copy_then_rewrite)
    with pytest.raises(UserError, match="changed on disk while the job ran"):
        write_result(small, result, tmp_path / "out", False, marks)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_read_only_source_with_out(variant, fresh, forget, tmp_path, monkeypatch):
    """As root, permissions are not enforced: os.access is made to report the source read-only,
    and an audit hook records every open() for writing; none may touch the source."""
    from fastunlearn.config import Config
    from fastunlearn.applying import apply

    ckpt = fresh(variant("llava"))
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode == os.W_OK and str(p).startswith(str(ckpt))
                        else real(p, mode, **kw))
    before = tree(ckpt)
    writes = []
    AUDIT.append(lambda path, mode, flags: writes.append(path) if str(path).startswith(str(ckpt)) and (
        (isinstance(mode, str) and any(m in mode for m in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR)) else None)
    try:
        report = apply(ckpt, forget, out=tmp_path / "out", config=Config(steps=2, views=0, device="cpu"), log=lambda *_: None)
    finally:
        AUDIT.clear()
    assert report["byte_proof"]["all_other_bytes_unchanged"]
    assert tree(ckpt) == before and writes == []
    assert (tmp_path / "out" / "unlearning_report.json").exists()


AUDIT = []  # callbacks for "open" audit events (a hook cannot be removed, so it is installed once)


def _audit(event, args):
    if event == "open" and AUDIT:
        for fn in AUDIT:
            fn(*args)


sys.addaudithook(_audit)


def test_feature_cache_spills_past_its_budget(monkeypatch):
    """Memory bounded by the budget, not the folder: past it, features go to disk and come back exact."""
    from fastunlearn.batches import BatchFeatures
    from fastunlearn.features import FeatureCache, SpilledFeatures

    cache = FeatureCache(budget=3 * 64 * 8 * 4)  # room for three [64, 8] fp32 features
    feats = {i: torch.randn(64, 8, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16 if i % 2 else torch.float32)
             for i in range(10)}
    for i, t in feats.items():
        cache[i] = t
    spilled = [i for i in feats if isinstance(cache[i], SpilledFeatures)]
    assert len(spilled) >= 6 and cache.in_memory <= cache.budget
    for i, t in feats.items():
        got = cache[i].to(torch.float32) if i in spilled else cache[i].float()
        assert torch.equal(got, t.float()) and cache[i].dtype == t.dtype
    parts = [cache[i] for i in range(10) if feats[i].dtype == torch.float32]
    assert torch.equal(BatchFeatures(parts, torch.device("cpu")).to(torch.float32),
                       torch.cat([feats[i] for i in range(10) if feats[i].dtype == torch.float32]))
    folder = Path(cache.folder.name)
    del cache, parts, got
    import gc

    gc.collect()
    assert not folder.exists()  # the temporary folder goes with the last feature that uses it
