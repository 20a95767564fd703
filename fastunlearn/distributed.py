"""Beyond one process (issue 12): data parallelism on torch.distributed, launched by torchrun.

    torchrun --nproc-per-node N -m fastunlearn apply CKPT FORGET_DIR --retain DIR ...

is the same job in N processes. Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) nothing here initialises torch.distributed and every helper is the
identity: a plain run is unchanged, bit for bit.

With N > 1 ranks:
- every rank reads the folders (validation is cheap) and agrees with the others on its inputs
  (`agree`: an all-gather of sha256 fingerprints of the checkpoint, the folders and the options)
  before any model is loaded; a rank that cannot start (busy checkpoint, bad destination) stops
  every rank there with the same line;
- pictures are owned round-robin (picture k -> rank k % N): a rank answers, caches and computes
  only its pictures' samples (`cache_samples`); the others' are `RemoteSample` stubs, so every
  rank holds the single-process sample list, in the single-process order;
- each global batch (the single-process batch) is split by owner (`make_batches`); each rank
  computes its part of the loss, scaled by its share of the batch (`local_term`), so that the
  all-reduced gradient (`all_reduce_grads`) is the single-process gradient up to reduction order;
  the Fisher sums are all-reduced once (`all_reduce_sum`); metrics are all-gathered (`summaries`);
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
import json
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

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
    dummy: object = None  # sharded LLM: a local sample every rank can run when it has nothing to run
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
    `shard`: shard the frozen LLM over the ranks (FSDP2, see `place_sharded`).
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


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


SAMPLE_BLOCKS, BLOCK = 64, 64 << 10
WHOLE_FILE_LIMIT = 64 << 20


def fingerprint_checkpoint(ckpt: Path) -> str:
    """sha256 over the checkpoint folder: every small file whole; each weight file's size, header
    and, beyond 64 MiB, 64 blocks of 64 KiB spread over it. Hashing a 146 GB checkpoint whole on every
    rank would take minutes, so a difference in a large weight file outside those blocks and the
    header is not seen here (rank 0 still checks, before writing, that the projector bytes it
    replaces are the ones it started from)."""
    from . import safetensors_io as st

    ckpt = Path(ckpt)
    h = hashlib.sha256()
    weights = {p.resolve() for p in st.weight_files(ckpt)}
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        rel = str(path.relative_to(ckpt))
        if rel == "unlearning_report.json" or path.name.startswith(".fastunlearn"):  # the report, the journal
            continue
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if path.resolve() not in weights or size <= WHOLE_FILE_LIMIT:
            h.update(_sha_file(path).encode())
            continue
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 100 << 20)))
            for k in range(SAMPLE_BLOCKS):
                f.seek(k * (size - BLOCK) // (SAMPLE_BLOCKS - 1))
                h.update(f.read(BLOCK))
    return h.hexdigest()


def fingerprint_folder(folder: Path | None) -> str | None:
    """sha256 of a data folder's contents: each regular file's relative path and bytes."""
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            h.update(f"{path.relative_to(folder)}\0{_sha_file(path)}\n".encode())
        elif path.is_symlink():
            h.update(f"{path.relative_to(folder)}\0link\0{os.readlink(path)}\n".encode())
    return h.hexdigest()


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


def config_fingerprint(cfg, **options) -> str:
    from dataclasses import asdict

    return hashlib.sha256(json.dumps({**asdict(cfg), **{k: str(v) for k, v in options.items()}},
                                     sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# sharded samples and batches


@dataclass
class RemoteSample:
    """A sample another rank owns: enough to place it in batches and normalise the loss."""

    view: int
    answer_tokens: int
    owner: int


def _owners(items) -> list[int]:
    """Owner rank of each item: pictures round-robin in order of first appearance (all of a picture's
    questions and views go to one rank, so its features are computed once); text items by index."""
    pictures: dict = {}
    owners = []
    for i, item in enumerate(items):
        key = item.image if item.image is not None else ("text", i)
        if key not in pictures:
            pictures[key] = len(pictures)
        owners.append(pictures[key] % world_size())
    return owners


def fill_answers(loaded, items, max_new_tokens):
    """features.fill_answers, each rank generating the greedy answers of its own pictures."""
    from .features import fill_answers as fill, greedy_answers

    if _state is None or _state.shard:
        # sharded LLM: every FSDP-wrapped layer call is a collective, so every rank must make the same
        # calls: each generates every answer (same inputs, same greedy tokens, same number of steps)
        return fill(loaded, items, max_new_tokens)
    owners = _owners(items)
    mine = [i for i, it in enumerate(items) if it.answer is None and owners[i] == rank()]
    answers = greedy_answers(loaded, [items[i] for i in mine], max_new_tokens)
    for part in all_gather_object(list(zip(mine, answers)), "sharing the greedy answers"):
        for i, answer in part:
            items[i].answer = answer
    return [it for it in items if it.answer]


def cache_samples(loaded, items, desc, views=0, seed=0, first_view=0) -> list:
    """features.cache_samples over this rank's pictures; the other ranks' samples as RemoteSample,
    in the single-process order."""
    from .features import cache_samples as cache

    if _state is None:
        return cache(loaded, items, desc, views, seed, first_view)
    owners = _owners(items)
    local, meta = {}, []
    for i, item in enumerate(items):
        if owners[i] != rank():
            continue
        for j, s in enumerate(cache(loaded, [item], desc, views, seed, first_view)):
            local[i, j] = s
            if _state.dummy is None:
                _state.dummy = s
            meta.append((i, j, s.view, len(s.input_ids) - s.answer_start))
    everything = sorted((m + (r,)) for r, part in enumerate(all_gather_object(meta, "sharing the sample list")) for m in part)
    return [local[i, j] if r == rank() else RemoteSample(view, tokens, r) for i, j, view, tokens, r in everything]


class EmptyBatch:
    """This rank's part of a global batch that holds none of its samples."""

    empty = True

    def __init__(self, loaded=None):
        self.lengths = torch.zeros(0)
        self.ref_nll = None
        self.loaded = loaded


def _dummy_batch(loaded):
    """A one-sample batch of this rank's, run with zero weight where a sharded LLM needs every rank."""
    from .batches import _batch

    if _state.dummy is None:
        raise UserError(f"rank {rank()}: holds no picture; a sharded LLM needs at least one picture per rank "
                        "(use fewer ranks)")
    if not isinstance(_state.dummy, tuple):
        b = _batch(loaded, [_state.dummy])
        b.ref_nll = torch.zeros(1, device=loaded.device)
        _state.dummy = (_state.dummy, b)
    return _state.dummy[1]


def make_batches(loaded, samples: list, batch_size: int) -> list:
    """batches.make_batches; under torchrun, each single-process batch's part this rank owns, with
    the global batch's size (`global_seqs`, `global_tokens`) for the loss scale, and each local
    sequence's position in `samples` (`positions`) for gathering metrics."""
    from .batches import _batch, make_batches as make

    if _state is None:
        return make(loaded, samples, batch_size)
    out = []
    for start in range(0, len(samples), batch_size):
        group = samples[start : start + batch_size]
        local = [(start + k, s) for k, s in enumerate(group) if not isinstance(s, RemoteSample)]
        b = _batch(loaded, [s for _, s in local]) if local else EmptyBatch(loaded)
        b.positions = [p for p, _ in local]
        b.global_seqs = len(group)
        b.global_tokens = sum(_tokens(s) for s in group)
        b.local_tokens = sum(_tokens(s) for _, s in local)
        out.append(b)
    return out


def _tokens(s) -> int:
    return s.answer_tokens if isinstance(s, RemoteSample) else len(s.input_ids) - s.answer_start


def _is_empty(b) -> bool:
    return getattr(b, "empty", False)


class Padding:
    """Sharded LLM: a stand-in sample, run with zero weight so that every rank makes as many calls."""

    def __init__(self, sample):
        self.sample = sample


def local_samples(samples: list) -> list:
    """The samples this rank computes (all of them on one process); with a sharded LLM, padded with
    `Padding` stand-ins to the largest share, so that every rank makes the same calls."""
    if _state is None:
        return samples
    mine = [s for s in samples if not isinstance(s, RemoteSample)]
    if not _state.shard:
        return mine
    counts = all_gather_object(len(mine), "counting samples")
    if max(counts) > len(mine):
        if _state.dummy is None:
            _dummy_batch(None)  # raises: this rank holds no picture
        stand_in = _state.dummy[0] if isinstance(_state.dummy, tuple) else _state.dummy
        mine += [Padding(stand_in)] * (max(counts) - len(mine))
    return mine


def unpad(sample):
    """(the sample to run, whether it is a zero-weight stand-in)."""
    return (sample.sample, True) if isinstance(sample, Padding) else (sample, False)


def place_sharded(model, device: torch.device) -> bool:
    """With a sharded LLM (FSDP2): each decoder layer of the frozen LLM fully_shard-ed over the ranks
    (its parameters split on dim 0, all-gathered for its forward and again for its backward, freed
    after each) and activation-checkpointed (its backward recomputes it); everything else (embeddings, final norm, lm_head, vision tower, projector) replicated
    on `device`. Frozen parameters get no gradient, so FSDP never reduce-scatters anything.
    Returns False (nothing done) unless the job runs sharded."""
    if not sharding():
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lm = model.model.language_model
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise UserError(f"{model.config.model_type}: no decoder layers found to shard (language_model.layers)")
    mesh = init_device_mesh(device.type, (_state.world,))
    for name, child in model.named_children():
        if child is not model.model:
            child.to(device)
    for name, child in model.model.named_children():
        if child is not lm:
            child.to(device)
    for name, child in lm.named_children():
        if child is not layers:
            child.to(device)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    total = sum(p.numel() * p.element_size() for p in layers.parameters())
    for i, layer in enumerate(layers):
        # activation checkpointing: the backward keeps only each layer's input and recomputes the
        # layer (a 72B layer's saved activations are ~0.3 MB per token; its input 16 KB)
        layers[i] = checkpoint_wrapper(layer)
        fully_shard(layers[i], mesh=mesh)  # moves this rank's shard to the mesh's device
    held = sum(p.to_local().numel() * p.element_size() for p in layers.parameters())
    _state.shard_bytes = (total, all_gather_object(held, "sharding the LLM")[0])
    for buf_owner in model.modules():  # rotary tables and other buffers
        for k, b in list(buf_owner.named_buffers(recurse=False)):
            if b.device != device:
                setattr(buf_owner, k, b.to(device))
    return True


def score(loaded, params, batches: list) -> dict:
    """forward.score over this rank's non-empty batches (local order)."""
    from .forward import score as run

    if not sharding():
        return run(loaded, params, [b for b in batches if not _is_empty(b)])
    # sharded LLM: run a stand-in for each empty part (every rank the same forward calls); drop its rows
    scores = run(loaded, params, [_dummy_batch(loaded) if _is_empty(b) else b for b in batches])
    keep = torch.cat([torch.zeros(1, dtype=torch.bool) if _is_empty(b) else torch.ones(len(b.lengths), dtype=torch.bool)
                      for b in batches]) if batches else torch.zeros(0, dtype=torch.bool)
    return {k: v[keep] for k, v in scores.items()}


def local_term(batch, kind: str, params: dict, term):
    """This rank's share of one loss term over `batch`: `term(batch)` scaled by the fraction of the
    global batch this rank holds (`kind`: "seqs" for a mean over sequences, "tokens" for a mean over
    answer tokens), so that the ranks' sum is the single-process term. One process: `term(batch)`."""
    if _state is None:
        return term(batch)
    if _is_empty(batch):
        if sharding():  # every rank must run the sharded layers, forward and backward: a zero-weight stand-in
            return term(_dummy_batch(batch.loaded)) * 0.0
        return sum((p * 0).sum() for p in params.values())  # in the graph, zero gradient
    if kind == "seqs":
        share = len(batch.positions) / batch.global_seqs
    elif kind == "tokens":
        share = batch.local_tokens / max(batch.global_tokens, 1)
    else:
        raise ValueError(kind)
    return term(batch) * share


def all_reduce_grads(params: dict, grads, loss) -> tuple[list, float]:
    """Sum the projector gradients and the loss over ranks, in one collective. Returns (gradients,
    loss as a float); identity on one process."""
    if _state is None:
        return list(grads), float(loss.detach())
    filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
    flat = _all_reduce_flat(torch.cat([_as_flat(filled), loss.detach().reshape(1).float().to(loss.device)]),
                            "summing the gradients")
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


def summaries(scores: dict, batches: list, slices: list[tuple[int, int]] | None = None) -> tuple[dict, list[dict]]:
    """forward.summarize over the whole set, and over each [start, end) slice of its sequences (the
    requests); under torchrun, the ranks' scores are gathered first (single-process order)."""
    from .forward import summarize

    if _state is None:
        nll, correct = scores["nll"], scores["correct"]
        tokens = torch.cat([b.lengths.cpu() for b in batches]) if batches else torch.zeros(0)
    else:
        mine = [p for b in batches for p in b.positions]
        tok = [float(x) for b in batches if not _is_empty(b) for x in b.lengths.cpu()]
        rows = {}
        for part in all_gather_object(list(zip(mine, scores["nll"].tolist(), scores["correct"].tolist(), tok)),
                                      "gathering the metrics"):
            rows.update({p: (n, c, t) for p, n, c, t in part})
        order = sorted(rows)
        nll = torch.tensor([rows[p][0] for p in order], dtype=torch.float32)
        correct = torch.tensor([rows[p][1] for p in order], dtype=torch.bool)
        tokens = torch.tensor([rows[p][2] for p in order], dtype=torch.float32)

    def one(lo, hi):
        return summarize({"nll": nll[lo:hi], "correct": correct[lo:hi]}, [SimpleNamespace(lengths=tokens[lo:hi])])

    return one(0, len(nll)), [one(lo, hi) for lo, hi in (slices or [])]


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
