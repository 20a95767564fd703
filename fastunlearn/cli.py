"""Command line: argument parsing only; the work is in the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError


def _add_job_options(p: argparse.ArgumentParser) -> None:
    from .unlearn import Config

    d = Config()
    p.add_argument("--method", default=d.method, help=f"npo | simnpo | ga | graddiff (default {d.method})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimisation steps (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    p.add_argument("--beta", type=float, default=d.beta, help=f"NPO/SimNPO inverse temperature (default {d.beta})")
    p.add_argument("--retain-weight", type=float, default=d.retain_weight, help=f"weight of the retain NLL (default {d.retain_weight})")
    p.add_argument("--mask", default=d.mask, help="fisher (MMUnlearner saliency mask) | none (default fisher)")
    p.add_argument("--mask-threshold", type=float, default=d.mask_threshold,
                   help=f"update where F_forget/F_retain >= this (default {d.mask_threshold})")
    p.add_argument("--views", type=int, default=d.views,
                   help=f"augmented variants of each picture to erase and retain too (default {d.views})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per batch (default {d.batch_size})")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda (default auto: cuda when available)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--anchor-weight", type=float, default=d.anchor_weight,
                   help=f"weight of the retain anchor: relative change of the projector output on retain pictures (default {d.anchor_weight})")
    p.add_argument("--holdout", type=float, default=d.holdout,
                   help=f"fraction of pictures set aside to decide when to stop and to check the targets; 0: fixed steps (default {d.holdout})")
    p.add_argument("--nullspace-energy", type=float, default=d.nullspace_energy,
                   help=f"project the update off the retain directions holding this energy; 0: off (default {d.nullspace_energy})")
    p.add_argument("--max-relative-update", type=float, default=d.max_relative_update,
                   help=f"trust region: cap ||dW|| / ||W|| per tensor; 0: off (default {d.max_relative_update})")


def _config(args):
    from .unlearn import Config

    return Config(method=args.method, steps=args.steps, lr=args.lr, beta=args.beta, retain_weight=args.retain_weight,
                  mask=args.mask, mask_threshold=args.mask_threshold, views=args.views, batch_size=args.batch_size, device=args.device,
                  seed=args.seed, anchor_weight=args.anchor_weight, holdout=args.holdout,
                  nullspace_energy=args.nullspace_energy, max_relative_update=args.max_relative_update)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastunlearn", description="Erase a visual concept from a multimodal LLM checkpoint "
                                 "by updating only its vision-to-language projector.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("apply", help="erase what FORGET_DIR shows from CKPT")
    p.add_argument("ckpt", type=Path, metavar="CKPT", help="Hugging Face checkpoint folder (safetensors)")
    p.add_argument("forget", type=Path, metavar="FORGET_DIR", help="pictures (and optional QA .jsonl) to forget")
    p.add_argument("--retain", type=Path, help="pictures (and optional QA .jsonl) that must keep working")
    p.add_argument("--out", type=Path, help="write a new checkpoint folder here (default: patch CKPT in place)")
    p.add_argument("--report", type=Path, help="report path (default: unlearning_report.json in the written checkpoint)")
    p.add_argument("--delta", type=Path, help="also save the weight delta here (apply it later with `patch`)")
    p.add_argument("--dry-run", action="store_true", help="run the job and report, write no checkpoint")
    _add_job_options(p)

    p = sub.add_parser("patch", help="apply a delta saved by `apply --delta`")
    p.add_argument("ckpt", type=Path, metavar="CKPT")
    p.add_argument("delta", type=Path, metavar="DELTA_FILE")

    p = sub.add_parser("verify", help="recompute metrics and the byte-level comparison of two checkpoints")
    p.add_argument("original", type=Path, metavar="ORIGINAL")
    p.add_argument("unlearned", type=Path, metavar="UNLEARNED")
    p.add_argument("forget", type=Path, metavar="FORGET_DIR")
    p.add_argument("--retain", type=Path)
    p.add_argument("--report", type=Path, help="write the JSON verification report here")
    p.add_argument("--html", type=Path, help="also write the report as a self-contained HTML page here")
    p.add_argument("--text", type=Path, help="text-only questions (.jsonl: question, answer) that must stay unchanged")
    p.add_argument("--no-probes", action="store_true", help="skip the relearning and linear-probe checks")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("report", help="summarise a report (apply's or verify's) and render it as HTML")
    p.add_argument("report", type=Path, metavar="REPORT.json")
    p.add_argument("--html", type=Path, metavar="OUT.html", help="write a self-contained HTML page here")

    p = sub.add_parser("demo", help="the embedded end-to-end example (small LLaVA, synthetic people)")
    p.add_argument("--workdir", type=Path, default=Path("fastunlearn-demo"), help="where to write (default ./fastunlearn-demo)")
    p.add_argument("--device", default="auto")
    return ap


def print_metrics(metrics: dict) -> None:
    print(f"{'set':<8} {'items':>6} {'greedy acc before':>18} {'after':>8} {'answer NLL before':>18} {'after':>8}")
    for name, m in metrics.items():
        b, a = m["before"], m["after"]
        print(f"{name:<8} {b['items']:>6} {b['greedy_accuracy']:>18.3f} {a['greedy_accuracy']:>8.3f} "
              f"{b['mean_token_nll']:>18.3f} {a['mean_token_nll']:>8.3f}")


def cmd_apply(args) -> None:
    from .unlearn import apply

    report = apply(args.ckpt, args.forget, args.retain, args.out, args.report, args.delta, args.dry_run, _config(args))
    print_metrics(report["metrics"])
    changed = report["changed_tensors"]
    n = sum(c["elements_changed"] for c in changed)
    print(f"changed {len(changed)} projector tensors, {n} elements, {report['byte_proof']['bytes_written']} bytes "
          f"in byte ranges; all other bytes unchanged: {report['byte_proof']['all_other_bytes_unchanged']}")
    if args.dry_run:
        print("dry run: no checkpoint written")
    else:
        print(f"written: {report['checkpoint']['written_to']}")
    if "report_path" in report:
        print(f"report: {report['report_path']}")
    if args.delta:
        print(f"delta: {args.delta}")


def cmd_patch(args) -> None:
    from .patch import patch

    result = patch(args.ckpt, args.delta)
    print(f"{result['status']}: {len(result['tensors'])} tensors, {result['bytes_written']} bytes written to {args.ckpt}")


def cmd_verify(args) -> None:
    from .verify import print_verification, verify

    result = verify(args.original, args.unlearned, args.forget, args.retain, device=args.device, text_path=args.text,
                    probes=not args.no_probes)
    print_verification(result)
    from .checkpoint import write_file_atomic

    if args.report:
        write_file_atomic(args.report, (json.dumps(result, indent=2) + "\n").encode())
        print(f"report: {args.report}")
    if args.html:
        from .html_report import render_html

        write_file_atomic(args.html, render_html(result).encode())
        print(f"html: {args.html}")


def cmd_report(args) -> None:
    from .html_report import load_report, render_html, summary_lines

    report = load_report(args.report)
    print("\n".join(summary_lines(report)))
    if args.html:
        from .checkpoint import write_file_atomic

        write_file_atomic(args.html, render_html(report).encode())
        print(f"html: {args.html}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.workdir, device=args.device)


def quiet_transformers() -> None:
    """transformers' load bars and fallback notices are noise in a job's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    quiet_transformers()
    try:
        {"apply": cmd_apply, "patch": cmd_patch, "verify": cmd_verify, "report": cmd_report,
         "demo": cmd_demo}[args.command](args)
    except UserError as e:
        print(f"fastunlearn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastunlearn: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
