import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastunlearn import delta, journal
from fastunlearn import safetensors_io as st
from fastunlearn.errors import UserError


def raw_safetensors(path, entries, data, metadata=None, pad=b""):
    """Write a safetensors file by hand: no alignment padding unless asked, keys in the given order."""
    header = dict(entries)
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    blob = json.dumps(header).encode() + pad
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def make_ckpt(folder, tensors, shards=1):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llava"}')
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / st.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_header_matches_safe_open(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=g).bfloat16(), "a": torch.randn(7, generator=g).half(),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    header = st.read_header(tmp_path / "m.safetensors")
    assert header.metadata == {"format": "pt"}
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        for name in tensors:
            info = header.tensors[name]
            if info.dtype in st.TORCH_DTYPES:
                assert torch.equal(st.read_tensor(info), f.get_tensor(name))
            assert st.read_bytes(info) == st.tensor_to_bytes(f.get_tensor(name))


def test_unaligned_unpadded_any_key_order(tmp_path):
    w = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    h = torch.tensor([7.0], dtype=torch.float16)
    # h's bytes first although listed second; odd header length, trailing spaces as padding
    data = st.tensor_to_bytes(h) + st.tensor_to_bytes(w)
    path = raw_safetensors(tmp_path / "x.safetensors",
                           {"w": {"dtype": "F32", "shape": [3], "data_offsets": [2, 14]},
                            "h": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}, data, pad=b"   ")
    header = st.read_header(path)
    assert torch.equal(st.read_tensor(header.tensors["w"]), w)
    assert torch.equal(st.read_tensor(header.tensors["h"]), h)


@pytest.mark.parametrize("case, message", [
    ("empty", "truncated"),
    ("huge_length", "does not fit"),
    ("bad_json", "malformed safetensors header"),
    ("not_object", "not a JSON object"),
    ("hole", "hole"),
    ("overlap", "overlap"),
    ("size_mismatch", "bytes for F32"),
    ("truncated_data", "truncated or malformed"),
    ("bad_shape", "bad shape"),
    ("bad_offsets", "bad data_offsets"),
    ("bad_metadata", "__metadata__"),
])
def test_malformed_headers_are_refused(tmp_path, case, message):
    path = tmp_path / "bad.safetensors"
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    data8 = bytes(8)
    if case == "empty":
        path.write_bytes(b"\x01\x02")
    elif case == "huge_length":
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif case == "bad_json":
        path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    elif case == "not_object":
        path.write_bytes(struct.pack("<Q", 2) + b"[]")
    elif case == "hole":
        raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
    elif case == "overlap":
        raw_safetensors(path, {**ok, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, data8)
    elif case == "size_mismatch":
        raw_safetensors(path, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, data8)
    elif case == "truncated_data":
        raw_safetensors(path, ok, bytes(5))
    elif case == "bad_shape":
        raw_safetensors(path, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, data8)
    elif case == "bad_offsets":
        raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, data8)
    elif case == "bad_metadata":
        raw_safetensors(path, ok, data8, metadata={"format": 3})
    with pytest.raises(UserError, match=message):
        st.read_header(path)


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        st.weight_files(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        st.weight_files(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text("{}")
    (tmp_path / "x" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="pickle"):
        st.weight_files(tmp_path / "x")


def test_sharded_index_is_checked(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(5)}
    folder = make_ckpt(tmp_path / "c", tensors, shards=2)
    stored = st.read_checkpoint(folder)
    assert set(stored) == set(tensors)
    assert len({info.file for info in stored.values()}) == 2
    index = json.loads((folder / st.INDEX_FILE).read_text())
    index["weight_map"]["t0"] = "model-00002-of-00002.safetensors" if stored["t0"].file.name.startswith("model-00001") \
        else "model-00001-of-00002.safetensors"
    (folder / st.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UserError, match="says 't0' is in"):
        st.read_checkpoint(folder)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patch_in_place_touches_only_the_ranges(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    tensors = {"proj.w": torch.randn(6, 5, generator=g).to(dtype), "other": torch.randn(11, generator=g).to(dtype),
               "z": torch.randn(3, generator=g).to(dtype)}
    folder = make_ckpt(tmp_path / "c", tensors, shards=2)
    before = _snapshot(folder)
    info = st.read_checkpoint(folder)["proj.w"]
    new = (tensors["proj.w"].float() * 2 + 1).to(dtype)
    journal.patch_in_place(folder, [(info.file.name, info.start, st.tensor_to_bytes(new))])
    after = _snapshot(folder)
    assert set(after) == set(before)  # no journal or lock file left behind
    for name in before:
        if name != info.file.name:
            assert after[name] == before[name]
    changed = [i for i, (x, y) in enumerate(zip(before[info.file.name], after[info.file.name])) if x != y]
    assert changed and info.start <= min(changed) and max(changed) < info.end
    with safe_open(folder / info.file.name, "pt") as f:
        assert torch.equal(f.get_tensor("proj.w"), new)


def _journal_case(tmp_path):
    tensors = {"w": torch.zeros(8), "v": torch.ones(4)}
    folder = make_ckpt(tmp_path / "c", tensors)
    info = st.read_checkpoint(folder)["w"]
    new = st.tensor_to_bytes(torch.full((8,), 3.0))
    writes = [("model.safetensors", info.start, new)]
    return folder, info, writes, (folder / "model.safetensors").read_bytes()


def test_recover_replays_a_committed_journal(tmp_path):
    folder, info, writes, old = _journal_case(tmp_path)
    # crash after the commit, in the middle of the data write: half the new bytes are in place
    (folder / journal.JOURNAL).write_bytes(journal._encode_journal(writes))
    half = writes[0][2][:13]
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(info.start)
        f.write(half)
    assert journal.recover(folder) is True
    expected = old[: info.start] + writes[0][2] + old[info.end :]
    assert (folder / "model.safetensors").read_bytes() == expected
    assert not (folder / journal.JOURNAL).exists()


def test_recover_drops_an_uncommitted_journal(tmp_path):
    folder, info, writes, old = _journal_case(tmp_path)
    blob = journal._encode_journal(writes)
    (folder / (journal.JOURNAL + ".tmp")).write_bytes(blob[: len(blob) // 2])  # crash while writing the journal
    assert journal.recover(folder) is False
    assert (folder / "model.safetensors").read_bytes() == old
    assert not (folder / (journal.JOURNAL + ".tmp")).exists()


def test_damaged_committed_journal_is_an_error(tmp_path):
    folder, _, writes, old = _journal_case(tmp_path)
    blob = bytearray(journal._encode_journal(writes))
    blob[-1] ^= 0xFF
    (folder / journal.JOURNAL).write_bytes(bytes(blob))
    with pytest.raises(UserError, match="damaged journal"):
        journal.recover(folder)
    assert (folder / "model.safetensors").read_bytes() == old


def test_lock_refuses_a_second_writer(tmp_path):
    # the lock is per process (re-entrant inside one, so a job can hold it end to end): a second
    # process holding it makes this one's writer refuse
    import subprocess
    import sys

    folder = make_ckpt(tmp_path / "c", {"w": torch.zeros(2)})
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)", str(folder)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="busy"):
            with journal.locked(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    with journal.locked(folder):
        with journal.locked(folder):  # re-entrant in one process
            pass


def test_delta_roundtrip_and_guards(tmp_path):
    w = torch.randn(4, 3).bfloat16()
    new = (w.float() + 0.5).bfloat16()
    changes = [{"name": "proj.w", "new": new, "before_sha256": st.sha256_bytes(st.tensor_to_bytes(w)),
                "after_sha256": st.sha256_bytes(st.tensor_to_bytes(new))}]
    delta.save_delta(tmp_path / "d.safetensors", changes)
    loaded = delta.load_delta(tmp_path / "d.safetensors")
    assert loaded[0]["data"] == st.tensor_to_bytes(new) and loaded[0]["dtype"] == "BF16"
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="not a fastunlearn delta"):
        delta.load_delta(tmp_path / "plain.safetensors")
