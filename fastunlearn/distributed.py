"""Beyond one process: data parallelism on torch.distributed, launched by torchrun.

    torchrun --nproc-per-node N -m fastunlearn apply CKPT FORGET_DIR --retain DIR ...

is the same job in N processes. Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) nothing here initialises torch.distributed and every helper is the
identity: a plain run is unchanged, bit for bit.

With N > 1 ranks:
- every rank reads the folders (validation is cheap) and agrees with the others on its inputs
  (`agree`: an all-gather of sha256 fingerprints of the checkpoint, the folders and the options,
  fingerprints.py)
  before any model is loaded; a rank that cannot start (busy checkpoint, bad destination) stops
  every rank there with the same line;
- the stages take this rank's view of the work, a `Ranks` (ranks.py, `ranks()`; one process: rank 0 of 1,
  owning everything, its collectives the identity);
- pictures are owned round-robin (picture k -> rank k % N): a rank answers, caches and computes
  only its pictures' samples (features.cache_samples); the others' are `RemoteSample` stubs, so
  every rank holds the single-process sample list, in the single-process order;
- each global batch (the single-process batch) is split by owner (batches.make_batches); each rank
  computes its sequences' share of each loss term, normalised by the whole batch's size
  (optimise.step_gradients), so that the summed gradient (`Ranks.sum_gradients`) is the
  single-process gradient up to reduction order; the Fisher sums are all-reduced once; metrics are
  all-gathered (forward.summarize);
- with the frozen LLM sharded (FSDP2, `ranks.place_sharded`) every layer call is a collective, so every
  rank makes the same calls: where it holds fewer sequences than another, it runs zero-weight
  stand-ins (`Ranks.stand_ins`);
- every rank runs the same masked AdamW on the same gradients; `same_state` broadcasts rank 0's
  projector and checks that every rank held those exact bytes;
- rank 0 alone locks, journals, writes the checkpoint and the report (`on_main`); the others
  write nothing and receive rank 0's report, or its failure;
- a failed collective (a rank died or raised: its sockets close) and torchrun's SIGTERM both end
  a rank with one line (`RankFailed`, exit status 9); nothing is written, because rank 0 writes
  only after the last collective that every rank must reach. A hung collective ends after
  FASTUNLEARN_DIST_TIMEOUT_S seconds (default 1800).

The backend is gloo on CPU (tests) and NCCL on CUDA (one device per rank, cuda:LOCAL_RANK).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import signal
import threading
from dataclasses import dataclass

import torch

from .errors import UserError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800


class RankFailed(UserError):
    """Another rank of a torchrun job died, raised, or disagreed; nothing was written."""

    exit_status = 9


@dataclass
class _State:
    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device
    shard: bool = False  # FSDP2: the frozen LLM's decoder layers sharded over the ranks
    defer_term: bool = False
    shard_bytes: tuple = ()  # sharded LLM: (decoder-layer bytes in the model, held by rank 0)


_state: _State | None = None
_previous_sigterm = None
_stopping = False  # this rank is on its way out with an error: SIGTERM waits for its one line
# The CLI exits right after its error line, so it keeps ignoring torchrun's SIGTERM after a failed
# job (a signal arriving between the job's end and the printing would kill the line); a program
# using the API gets its own SIGTERM handler back when the job ends, failed or not.
HOLD_SIGTERM_AFTER_FAILURE = False


# ---------------------------------------------------------------------------------------------
# set-up, identity, failure


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def active() -> bool:
    return _state is not None


def rank() -> int:
    return _state.rank if _state else 0


def world_size() -> int:
    return _state.world if _state else 1


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    raw = os.environ.get("FASTUNLEARN_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"FASTUNLEARN_DIST_TIMEOUT_S={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise UserError("FASTUNLEARN_DIST_TIMEOUT_S must be positive")
    return value


def init(device: torch.device, shard: bool = False) -> torch.device:
    """Join torchrun's process group (once); returns this rank's device (cuda:LOCAL_RANK on CUDA).
    `shard`: shard the frozen LLM over the ranks (FSDP2, see `ranks.place_sharded`).
    Without torchrun's environment: nothing happens and `device` is returned as it is."""
    global _state, _previous_sigterm, _stopping
    if _state is not None:
        return _state.device
    if not launched_by_torchrun():
        return device
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA devices here; "
                            "use --nproc-per-node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = os.environ.get("FASTUNLEARN_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()),
                                **({"device_id": device} if device.type == "cuda" else {}))
    except Exception as e:  # the rendezvous failed: another rank is gone or the store is unreachable
        raise RankFailed(f"rank {os.environ['RANK']}: cannot join the torchrun job ({_first_line(e)}); nothing was written") from None
    _state = _State(dist.get_rank(), dist.get_world_size(), local_rank, backend, device, shard)
    _stopping = False
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    return device


def shutdown() -> None:
    """Leave the process group (end of the job, success or failure)."""
    global _state
    if _state is None:
        return
    import torch.distributed as dist

    backend, _state = _state.backend, None
    if _previous_sigterm is not None and not (_stopping and HOLD_SIGTERM_AFTER_FAILURE):
        signal.signal(signal.SIGTERM, _previous_sigterm)
    if _stopping and backend == "nccl":
        return  # after a peer's loss NCCL's teardown can block; the process is ending anyway
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def stopping() -> None:
    """This rank is ending with an error: a SIGTERM from torchrun no longer interrupts it."""
    global _stopping
    _stopping = True


def describe() -> dict:
    """For the report: how many processes ran the job, on which backend."""
    if _state is None:
        return {"world_size": 1, "backend": None, "launcher": None}
    return {"world_size": _state.world, "backend": _state.backend, "launcher": "torchrun",
            "sample_ownership": "picture k -> rank k % world_size", "written_by_rank": 0,
            "llm": "sharded: FSDP2 fully_shard per decoder layer" if _state.shard else "replicated",
            **({"decoder_layer_bytes": _state.shard_bytes[0], "decoder_layer_bytes_held_by_rank_0": _state.shard_bytes[1]}
               if _state.shard_bytes else {})}


def sharding() -> bool:
    return _state is not None and _state.shard


def _first_line(e: BaseException) -> str:
    """The gist of an error: its first line, without gloo's source location and advice."""
    import re

    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text[0]) if text else e.__class__.__name__
    return line.split(". This is typically")[0][:200]


def _on_sigterm(signum, frame):
    # torchrun sends SIGTERM to every rank once one has failed
    if _stopping:
        return  # already ending with its own error line
    if _state is not None and _state.defer_term:
        return  # rank 0 is writing: finish it (every rank had finished its part; the write is crash-safe anyway)
    stopping()
    raise RankFailed(f"rank {rank()}: stopped by torchrun because another rank failed; nothing was written")


def as_failure(e: BaseException) -> RankFailed | None:
    """A collective that failed outside `_collective` (inside FSDP's all-gathers): the one-line
    RankFailed it means, or None for any other error (a bug keeps its traceback)."""
    if _state is None or isinstance(e, UserError):
        return None
    import torch.distributed as dist

    text = str(e)
    if isinstance(e, getattr(dist, "DistError", ())) or any(k in text for k in ("Gloo", "gloo", "NCCL", "Connection closed",
                                                                                 "Connection reset", "Broken pipe")):
        return RankFailed(f"rank {rank()}: a collective failed: another rank stopped or failed ({_first_line(e)}); "
                          "nothing was written")
    return None


def _collective(what: str, fn, *args, **kwargs):
    """Run a collective; a failure (a peer died or raised, a timeout) becomes one RankFailed line."""
    try:
        return fn(*args, **kwargs)
    except RankFailed:
        raise
    except Exception as e:  # torch raises RuntimeError / DistBackendError / DistNetworkError
        raise RankFailed(f"rank {rank()}: {what}: another rank stopped or failed ({_first_line(e)}); "
                         "nothing was written") from None


def all_gather_object(obj, what="exchanging results"):
    if _state is None:
        return [obj]
    import torch.distributed as dist

    out = [None] * _state.world
    _collective(what, dist.all_gather_object, out, obj)
    return out


def _as_flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors]) if tensors else torch.zeros(0)


def _all_reduce_flat(flat: torch.Tensor, what: str) -> torch.Tensor:
    import torch.distributed as dist

    buf = flat.to(_state.device)
    _collective(what, dist.all_reduce, buf, op=dist.ReduceOp.SUM)
    return buf.to(flat.device)


def all_reduce_sum(tensors: dict[str, torch.Tensor], what="summing the Fisher statistics") -> dict[str, torch.Tensor]:
    """Sum a dict of float tensors over ranks (one collective for all of them); identity on one process."""
    if _state is None:
        return tensors
    names = list(tensors)
    flat = _all_reduce_flat(_as_flat([tensors[n] for n in names]), what)
    out, pos = {}, 0
    for n in names:
        t = tensors[n]
        out[n] = flat[pos : pos + t.numel()].reshape(t.shape).to(t.dtype)
        pos += t.numel()
    return out


# ---------------------------------------------------------------------------------------------
# input agreement


def agree(inputs: dict, problem: UserError | None = None) -> None:
    """Every rank states its inputs' fingerprints (and whether it could start); all stop, before any
    work, unless all could start and all fingerprints equal rank 0's. `inputs` maps a name to a
    zero-argument function returning a JSON-able value (evaluated only under torchrun)."""
    if _state is None:
        if problem is not None:
            raise problem
        return
    if problem is None:
        try:
            inputs = {k: f() for k, f in inputs.items()}
        except UserError as e:
            problem = e
    mine = {"problem": None if problem is None else [problem.__class__.__name__, str(problem), problem.exit_status],
            "inputs": inputs if problem is None else None}
    everyone = all_gather_object(mine, "agreeing on the inputs")
    if problem is not None:
        raise problem
    for r, theirs in enumerate(everyone):
        if theirs["problem"] is not None:
            err = RankFailed(f"rank {rank()}: rank {r} cannot start: {theirs['problem'][1]}")
            err.exit_status = theirs["problem"][2]
            raise err
    reference = everyone[0]["inputs"]
    for r, theirs in enumerate(everyone[1:], start=1):
        differ = [k for k in reference if theirs["inputs"].get(k) != reference[k]]
        if differ:
            raise UserError(f"rank {r}'s inputs differ from rank 0's ({', '.join(differ)}): every rank must get the "
                            "same checkpoint bytes, folders and options; nothing was done")


def all_reduce_grads(params: dict, grads, value: float) -> tuple[list, float]:
    """Sum the projector gradients (None: zero) and the loss `value` over ranks, in one collective.
    Returns (gradients, loss)."""
    filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
    flat = _as_flat(filled)
    flat = _all_reduce_flat(torch.cat([flat, flat.new_tensor([value])]), "summing the gradients")
    out, pos = [], 0
    for g in filled:
        out.append(flat[pos : pos + g.numel()].reshape(g.shape).to(device=g.device, dtype=g.dtype))
        pos += g.numel()
    return out, float(flat[pos])


def same_state(params: dict) -> bool | None:
    """Broadcast rank 0's projector to every rank (in place) and check every rank held exactly those
    bytes. None on one process."""
    if _state is None:
        return None
    import torch.distributed as dist

    names = sorted(params)
    digest = hashlib.sha256(b"".join(params[n].detach().cpu().contiguous().numpy().tobytes() for n in names)).hexdigest()
    flat = _as_flat([params[n].detach() for n in names]).to(_state.device)
    _collective("sharing the projector", dist.broadcast, flat, src=0)
    pos = 0
    for n in names:
        p = params[n]
        p.data.copy_(flat[pos : pos + p.numel()].reshape(p.shape))
        pos += p.numel()
    digests = all_gather_object(digest, "checking the projector")
    return len(set(digests)) == 1


# ---------------------------------------------------------------------------------------------
# rank 0 writes


def on_main(fn):
    """Run `fn` (the write and the report) on rank 0 alone, once every rank has finished its part
    (a last all-gather: a rank lost before it means nothing is written), SIGTERM deferred while it
    runs; every other rank waits and returns rank 0's result, or stops with one line if rank 0
    failed. Once rank 0 has written, a rank lost afterwards no longer changes rank 0's outcome.
    One process: `fn()`."""
    if _state is None:
        return fn()
    import torch.distributed as dist

    all_gather_object(True, "waiting for every rank to finish before the write")
    box = [None]
    error = None
    if is_main():
        _state.defer_term = True
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            error, box[0] = e, ("failed", str(e), e.exit_status)
        except BaseException as e:
            error, box[0] = e, ("failed", _first_line(e), 1)
        finally:
            _state.defer_term = False
    try:
        _collective("waiting for rank 0 to write", dist.broadcast_object_list, box, src=0)
    except RankFailed:
        if is_main() and error is None:
            return box[0][1]  # written and reported: the peers' loss now changes nothing
        raise
    if error is not None:
        raise error
    if box[0][0] != "ok":
        err = RankFailed(f"rank {rank()}: rank 0 failed: {box[0][1]}")
        err.exit_status = box[0][2]
        raise err
    return box[0][1]


def test_die(phase: str) -> None:
    """Test hook, inert unless FASTUNLEARN_TEST_DIE is `RANK:PHASE` (that rank kills itself with
    SIGKILL at `phase`, as a crashed or OOM-killed rank would) or `RANK:PHASE:raise` (it raises)."""
    spec = os.environ.get("FASTUNLEARN_TEST_DIE")
    if not spec or _state is None:
        return
    if spec == f"{_state.rank}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec == f"{_state.rank}:{phase}:raise":
        raise RuntimeError(f"injected failure at {phase} (FASTUNLEARN_TEST_DIE)")
