"""`apply`, the job as the public API and the CLI run it: the checkpoint checked, `job.unlearn` run
(it loads the checkpoint and computes the change in memory), then the result written crash-safely
(patched in place under the checkpoint's lock and redo journal, or a new folder with --out; none
with --dry-run), the delta saved when asked, the byte proof that no byte outside the change moved,
and the report.

Under torchrun every rank runs the job; rank 0 alone locks, recovers, writes and reports
(distributed.py).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from pathlib import Path

from . import distributed as dist  # torchrun data parallelism (identity on one process)
from . import job  # job.unlearn is looked up at call time: a test may stand in for it
from . import journal
from . import safetensors_io as st
from .config import Config, pick_device
from .data import forget_folders
from .delta import save_delta
from .errors import UserError
from .fingerprints import config_fingerprint, fingerprint_checkpoint, fingerprint_folder
from .load import check_weights_match_config
from .write import preflight, write_result

logger = logging.getLogger("fastunlearn")


def apply(ckpt, forget_dir, retain_dir=None, *, out=None, report_path=None, delta_path=None, dry_run=False,
          config: Config | None = None, log=None) -> dict:
    """Erase what `forget_dir` shows from the checkpoint folder `ckpt`; keep what `retain_dir` shows.

    Patches `ckpt` in place (crash-safe), or writes a new checkpoint folder `out`; `dry_run` writes
    no checkpoint. Writes the JSON report (default: unlearning_report.json in the written
    checkpoint) and, with `delta_path`, the delta for `patch`. Returns the report as a plain dict.
    Raises UserError (or a subclass, see errors.py) for input it cannot use, before any write.
    `log` receives one-line notes (default: the "fastunlearn" logger)."""
    cfg = config or Config()
    log = log or logger.info
    cfg.check()
    started = time.perf_counter()
    ckpt = Path(ckpt)
    # under torchrun, join the process group; rank 0 alone locks, recovers, writes
    dist.init(pick_device(cfg.device), shard=cfg.shard_llm)
    try:
        return _apply(ckpt, forget_dir, retain_dir, out, report_path, delta_path, dry_run, cfg, log, started)
    except Exception as e:
        dist.stopping()  # torchrun's SIGTERM must not cut this rank's error line
        failure = dist.as_failure(e)  # a peer's death seen inside FSDP's collectives: one line
        if failure is None:
            raise
        raise failure from None
    finally:
        dist.shutdown()


def _apply(ckpt, forget_dir, retain_dir, out, report_path, delta_path, dry_run, cfg, log, started) -> dict:
    in_place = out is None and not dry_run
    main = dist.is_main()
    folders = forget_folders(forget_dir)
    # an in-place job holds the checkpoint's lock from start to end: a second one says "busy" at once
    problem, stamps = None, None
    with contextlib.ExitStack() as stack:
        try:
            check_weights_match_config(ckpt)
            if in_place and main:
                stack.enter_context(journal.locked(ckpt))
            if main and ((ckpt / journal.JOURNAL).exists() or (ckpt / (journal.JOURNAL + ".tmp")).exists()):
                if journal.recover(ckpt):
                    log(f"finished an interrupted patch of {ckpt}")
            if main:
                preflight(ckpt, out, dry_run)
                stamps = {p.resolve(): st.file_stamp(p) for p in st.weight_files(ckpt)}
        except UserError as e:
            problem = e
        # every rank could start and got the same inputs, or every rank stops here
        dist.agree({"checkpoint": lambda: fingerprint_checkpoint(ckpt),
                    "forget": lambda: [fingerprint_folder(d) for d in folders],
                    "retain": lambda: fingerprint_folder(retain_dir),
                    "options": lambda: config_fingerprint(cfg, out=out, dry_run=dry_run, delta=delta_path,
                                                               report=report_path)}, problem)

        result = job.unlearn(ckpt, folders, Path(retain_dir) if retain_dir else None, cfg, log)
        gc.collect()

        def write_and_report():  # rank 0 only; the whole job on one process
            journal.test_pause("before-write")
            t_write = time.perf_counter()
            proof = write_result(ckpt, result, Path(out) if out else None, dry_run, stamps)
            result["phases_s"]["write"] = round(time.perf_counter() - t_write, 3)
            result["phases_s"]["total"] = round(time.perf_counter() - started, 3)
            return _finish(result, proof, ckpt, folders, retain_dir, report_path, delta_path, dry_run)

        return dist.on_main(write_and_report)


def _finish(result, proof, ckpt, forget_dir, retain_dir, report_path, delta_path, dry_run) -> dict:
    from .report import build_report

    report = build_report(result, proof, source=ckpt, forget_dir=forget_dir, retain_dir=retain_dir)
    if report_path is None and not dry_run:
        report_path = Path(proof["written_to"]) / "unlearning_report.json"
    if report_path is not None:
        journal.write_file_atomic(Path(report_path), (json.dumps(report, indent=2) + "\n").encode())
        report["report_path"] = str(report_path)
    if delta_path is not None:
        save_delta(Path(delta_path), result["changes"])
    if not report["byte_proof"]["all_other_bytes_unchanged"] and not dry_run:
        raise UserError(f"bytes outside the projector changed in {proof['written_to']} during the write; see {report_path}")
    return report
