"""Fuzzed safetensors headers, delta files and shard indexes (scripts/fuzz_headers.py; a longer
run: `python scripts/fuzz_headers.py --cases 200000`): each case ends in a one-line UserError or
a read that matches safetensors' own reader; never another exception, a hang, a big allocation
or a write."""
import json
import struct
import sys
import tracemalloc
from pathlib import Path

import pytest

from fastunlearn import safetensors_io as st
from fastunlearn.errors import UserError

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import fuzz_headers  # noqa: E402

CASES = 5000


def test_fuzzed_headers_end_in_a_clear_error_or_a_correct_read(tmp_path):
    result = fuzz_headers.run(CASES, seed=0, folder=tmp_path, stop_on_failure=False)
    print(f"\nfuzz: {CASES} cases, seed 0: {result}")
    assert result["failures"] == []
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == CASES
    # the fuzzer reaches both ends: refusals and verified reads, for headers, deltas and indexes
    for kind in ("header", "delta", "index"):
        assert outcomes.get(f"{kind} refused", 0) > 0 and outcomes.get(f"{kind} read", 0) > 0, outcomes


def _file(tmp_path, prefix: int, header: bytes, data: bytes = b"") -> Path:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", prefix) + header + data)
    return path


@pytest.mark.parametrize("prefix", [2**64 - 1, 2**63, 2**48, 100 * 2**20 + 1, 2**40])
def test_huge_length_prefix_reads_nothing_big(tmp_path, prefix):
    path = _file(tmp_path, prefix, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4))
    tracemalloc.start()
    with pytest.raises(UserError, match="does not fit"):
        st.read_header(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**48 - 1] * 3, [2**16] * 4, [2**47, 2**47, 0, 5]])
def test_shape_products_past_48_and_64_bits(tmp_path, shape):
    # [2**32, 2**32] F32 wraps to 0 bytes in 64-bit arithmetic; here it must not match a 0-byte range
    header = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = _file(tmp_path, len(header), header)
    if 0 in shape:
        assert st.read_header(path).tensors["a"].shape == tuple(shape)  # zero elements, zero bytes: valid
    else:
        with pytest.raises(UserError, match="0 bytes for F32"):
            st.read_header(path)


def test_big_valid_header_is_read_in_bounded_time(tmp_path):
    """A 20 MB header (10,000 tensors of zero bytes, space padding) is a correct read."""
    import time

    entries = {f"t{i}": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]} for i in range(10_000)}
    header = json.dumps(entries).encode() + b" " * (20 * 2**20)
    path = _file(tmp_path, len(header), header)
    t = time.perf_counter()
    assert len(st.read_header(path).tensors) == 10_000
    assert time.perf_counter() - t < 10


def test_deep_nesting_and_huge_numbers(tmp_path):
    for header in (b"[" * 200_000 + b"]" * 200_000, b'{"a": {"dtype": "F32", "shape": [' + b"9" * 10_000 + b'], "data_offsets": [0, 4]}}'):
        with pytest.raises(UserError, match="malformed safetensors header"):
            st.read_header(_file(tmp_path, len(header), header, bytes(4)))
