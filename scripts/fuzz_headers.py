"""Fuzz fastunlearn's safetensors readers: every case must end in a one-line UserError or a correct read.

    python scripts/fuzz_headers.py --cases 200000 [--seed 0]      # the longer run (CI runs 3,000: tests/test_fuzz.py)

Each case takes a valid file (safetensors files of several dtypes and shapes, a fastunlearn delta,
a shard index) and mutates it, seeded by (seed, case number): the u64 length prefix (0, tiny,
huge, 2**64-1, off by a few), the JSON bytes (flips, cuts, inserts, non-UTF-8), the entries
(dtypes, shapes with negative / float / 48-bit-overflowing dims, offsets that overlap, leave
holes, run backwards or out of range, 2**63), deep nesting, huge numbers, extra or missing
tensors, the data (cut or extended). Then it calls `read_header` (or `load_delta`, or
`read_checkpoint` for an index) and classifies the outcome:

- "refused": UserError with a one-line message;
- "read": parsed; then every tensor's bytes must equal what `safetensors.safe_open` reads;
- anything else (another exception, a parse safetensors refuses, a case over 1 s) is a failure,
  printed with the seed and case number to reproduce it.
No case may open a file for writing (an audit hook counts such opens).
"""
from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from fastunlearn import delta
from fastunlearn import safetensors_io as st
from fastunlearn.errors import UserError

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U16", "X", "f32", "", 3, None]
BIG = [2**16, 2**31, 2**32, 2**47, 2**48 - 1, 2**48, 2**62, 2**63, 2**64 - 1, 2**64, 10**30]


def base_files() -> list[tuple[str, bytes]]:
    g = torch.Generator().manual_seed(0)
    a = save({"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).half(),
              "e": torch.zeros(0, 5), "i": torch.arange(6, dtype=torch.int64).reshape(2, 3)}, metadata={"format": "pt"})
    b = save({"x": torch.randn(2, 2, generator=g).bfloat16(), "s": torch.tensor(1.5)})
    old, new = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    delta_file = save({"proj.w": new}, metadata={delta.DELTA_KEY: json.dumps({"proj.w": {
        "before_sha256": st.sha256_bytes(st.tensor_to_bytes(old)), "after_sha256": st.sha256_bytes(st.tensor_to_bytes(new))}})})
    return [("a", a), ("b", b), ("delta", delta_file)]


def split(blob: bytes):
    (n,) = struct.unpack("<Q", blob[:8])
    return n, blob[8 : 8 + n], blob[8 + n :]


def join(header: bytes, data: bytes, n: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if n is None else n % 2**64) + header + data


def mutate_entry(rng: random.Random, entry: dict, datalen: int) -> None:
    what = rng.choice(["dtype", "shape", "offsets", "offsets", "drop", "extra"])
    if what == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif what == "shape":
        shape = list(entry.get("shape", [1]))
        kind = rng.choice(["neg", "big", "overflow", "float", "str", "many", "empty", "zero", "notlist"])
        if kind == "neg":
            shape = [-rng.randint(1, 5)] + shape
        elif kind == "big":
            shape = [rng.choice(BIG)] + shape
        elif kind == "overflow":  # the product wraps to a small number in 64-bit arithmetic
            shape = [2**32, 2**32] if rng.random() < 0.5 else [2**48 - 1, 2**48 - 1, 2**16]
        elif kind == "float":
            shape = [2.0] + shape
        elif kind == "str":
            shape = ["2"]
        elif kind == "many":
            shape = [1] * rng.randint(100, 5000) + shape
        elif kind == "empty":
            shape = []
        elif kind == "zero":
            shape = [0] + shape
        else:
            shape = rng.choice([5, "x", None, {"a": 1}])
        entry["shape"] = shape
    elif what == "offsets":
        lo, hi = (entry.get("data_offsets") or [0, 0])[:2]
        kind = rng.choice(["shift", "swap", "big", "negative", "len", "float", "past_end", "overlap"])
        if kind == "shift":
            d = rng.randint(-8, 8)
            entry["data_offsets"] = [lo + d, hi + d]
        elif kind == "swap":
            entry["data_offsets"] = [hi, lo]
        elif kind == "big":
            entry["data_offsets"] = [lo, rng.choice(BIG)]
        elif kind == "negative":
            entry["data_offsets"] = [-1, hi]
        elif kind == "len":
            entry["data_offsets"] = [lo, hi, hi][: rng.choice([0, 1, 3])]
        elif kind == "float":
            entry["data_offsets"] = [float(lo), hi]
        elif kind == "past_end":
            entry["data_offsets"] = [lo, datalen + rng.randint(1, 100)]
        else:
            entry["data_offsets"] = [0, max(hi, 1)]
    elif what == "drop":
        entry.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
    else:
        entry[rng.choice(["extra", "dtype "])] = rng.choice([1, "x", [1]])


def mutate(rng: random.Random, blob: bytes) -> bytes:
    n, header, data = split(blob)
    kind = rng.choice(["prefix", "bytes", "bytes", "entry", "entry", "entry", "structure", "data", "nesting"])
    if kind == "prefix":
        n2 = rng.choice([0, 1, 2, 7, n - 1, n + 1, n + rng.randint(2, 64), len(blob), len(blob) - 8, 2**64 - 1,
                         100 * 2**20, 100 * 2**20 + 1, 2**63, 2**48])
        return join(header, data, n2)
    if kind == "bytes":
        h = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            op = rng.choice(["flip", "cut", "insert", "delete"])
            i = rng.randrange(max(1, len(h)))
            if op == "flip" and h:
                h[i] = rng.randrange(256)
            elif op == "cut":
                h = h[:i]
            elif op == "insert":
                h[i:i] = rng.choice([b"\xff", b"\xc3", b"\x00", b"{", b"}", b"]", b",", b'"', b"9" * 5000, b"1e400"])
            elif op == "delete" and h:
                del h[i]
        return join(bytes(h), data, n if rng.random() < 0.3 else None)
    obj = json.loads(header)
    names = [k for k in obj if k != "__metadata__"]
    if kind == "entry" and names:
        mutate_entry(rng, obj[rng.choice(names)], len(data))
    elif kind == "structure":
        op = rng.choice(["dup", "drop", "metadata", "list", "entry_type", "key"])
        if op == "dup" and names:
            obj["copy"] = dict(obj[rng.choice(names)])
        elif op == "drop" and names:
            del obj[rng.choice(names)]
        elif op == "metadata":
            obj["__metadata__"] = rng.choice([{"a": 1}, "x", [], {"a": "b"}, None, {delta.DELTA_KEY: "{bad"},
                                              {delta.DELTA_KEY: json.dumps({n: "x" for n in names})},
                                              {delta.DELTA_KEY: "[" * 100000 + "]" * 100000}])
        elif op == "list":
            obj = [obj]
        elif op == "entry_type" and names:
            obj[rng.choice(names)] = rng.choice([1, "x", [], None])
        elif op == "key":
            obj["\ud800" if rng.random() < 0.5 else "k" * 10000] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    elif kind == "data":
        data = data[: rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + bytes(rng.randint(1, 64))
    elif kind == "nesting":
        header2 = ("[" * rng.choice([1000, 100000]) + "]" * 100000).encode()
        return join(header2, data)
    try:
        text = json.dumps(obj).encode()
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True).encode()
    if rng.random() < 0.3:
        text += b" " * rng.randint(1, 9)  # padding, as safetensors writes it
    return join(text, data)


def check_read(path: Path, kind: str) -> str:
    """'refused' or 'read' (verified against safe_open); raises AssertionError otherwise."""
    try:
        if kind == "delta":
            changes = delta.load_delta(path)
            parsed = {c["name"]: c["data"] for c in changes}
        else:
            header = st.read_header(path)
            parsed = {name: st.read_bytes(info) for name, info in header.tensors.items()}
    except UserError as e:
        assert "\n" not in str(e) and str(e), f"not a one-line message: {str(e)[:300]!r}"
        return "refused"
    try:
        with safe_open(path, "pt") as f:
            theirs = {name: st.tensor_to_bytes(f.get_tensor(name)) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - any refusal by the reference reader is a finding
        raise AssertionError(f"fastunlearn read a file safetensors refuses ({e})") from None
    assert parsed == theirs if kind != "delta" else all(theirs[n] == d for n, d in parsed.items()), "bytes differ from safe_open"
    return "read"


def check_index(rng: random.Random, folder: Path, blob: bytes) -> str:
    weight_map = {"w": "model-1.safetensors", "b": "model-1.safetensors", "e": "model-1.safetensors",
                  "i": "model-1.safetensors"}
    text = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    h = bytearray(text)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(h))
        h[i:i + rng.randint(0, 3)] = rng.choice([b"", b"\xff", b"[", b"}", b'"../x.safetensors"', b"0", b"{}", b"null"])
    if not (folder / "config.json").exists():
        (folder / "config.json").write_text('{"model_type": "llava"}')
        (folder / "model-1.safetensors").write_bytes(blob)
    (folder / st.INDEX_FILE).unlink(missing_ok=True)
    (folder / st.INDEX_FILE).write_bytes(bytes(h))
    try:
        stored = st.read_checkpoint(folder)
    except UserError as e:
        assert "\n" not in str(e), f"not a one-line message: {str(e)[:300]!r}"
        return "refused"
    assert set(stored) == set(weight_map), "read an index that names other tensors"
    return "read"


WRITES = []


def _audit(event, args):
    if event == "open" and WRITES is not None and len(args) >= 2:
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        if (isinstance(mode, str) and any(m in mode for m in "wax+")) or (flags or 0) & 0o3:
            WRITES.append(args[0])


def run(cases: int, seed: int = 0, folder: Path | None = None, stop_on_failure=True) -> dict:
    """Run `cases` cases; returns {outcome: count} (and "failures": [...])."""
    own = tempfile.TemporaryDirectory() if folder is None else None
    folder = Path(own.name) if own else folder
    bases = base_files()
    index_shard = bases[0][1]
    outcomes, failures = Counter(), []
    sys.addaudithook(_audit)
    slowest = 0.0
    for case in range(cases):
        rng = random.Random(f"{seed}:{case}")
        name, blob = rng.choice(bases)
        mutated = mutate(rng, blob)
        for _ in range(rng.choice([0, 0, 1])):  # a second mutation now and then
            try:
                mutated = mutate(rng, mutated)
            except (ValueError, UnicodeDecodeError, struct.error, RecursionError, TypeError, AttributeError):
                break
        path = folder / f"case-{case}.safetensors"  # a new file: truncating one is slow on some filesystems
        path.write_bytes(mutated)
        WRITES.clear()
        t = time.perf_counter()
        try:
            if case % 10 == 9:
                sub = folder / "index-case"
                sub.mkdir(exist_ok=True)
                outcome = "index " + check_index(rng, sub, index_shard)
                WRITES.clear()  # the case's own files were written above; the read is checked next time
            else:
                outcome = ("delta " if name == "delta" else "header ") + check_read(path, "delta" if name == "delta" else "header")
            elapsed = time.perf_counter() - t
            slowest = max(slowest, elapsed)
            assert elapsed < 1.0, f"took {elapsed:.2f} s"
            assert not WRITES, f"opened for writing: {WRITES}"
        except Exception as e:  # noqa: BLE001 - every unexpected outcome is reported with its case
            failures.append(f"seed {seed} case {case} ({name}): {e.__class__.__name__}: {str(e)[:300]}")
            outcome = "FAILED"
            if stop_on_failure:
                break
        outcomes[outcome] += 1
        path.unlink()
    if own:
        own.cleanup()
    return {"outcomes": dict(outcomes), "failures": failures, "slowest_s": round(slowest, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t = time.time()
    result = run(args.cases, args.seed, stop_on_failure=False)
    print(json.dumps({**result, "cases": args.cases, "seed": args.seed, "seconds": round(time.time() - t, 1)}, indent=1))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
