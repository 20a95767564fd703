"""Command line: argument parsing and printing only; the work is the public API (fastunlearn.apply,
verify, patch), and every refusal is a UserError whose exit_status the process returns."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserError


def _add_job_options(p: argparse.ArgumentParser) -> None:
    from .config import Config

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
    p.add_argument("--no-holdout", action="store_true",
                   help="train once, on every picture (default: a first run without one picture of each subject that "
                   "has two or more measures the erasure on them, then the last run trains on every picture)")
    p.add_argument("--select-step", action="store_true",
                   help="the held-out pictures choose the step count (scored every tenth of --steps)")
    p.add_argument("--search", action="store_true",
                   help="the held-out pictures also choose between the given settings, the same with --anchor-weight "
                   "10, and a gentler one (a tenth of --lr, --mask none, --retain-weight + 2, a fifth more --steps)")
    p.add_argument("--scope", default=d.scope, metavar="connector|vision:K",
                   help="what may change: the connector alone (default), or with vision:K also the last K layers of "
                   "the vision tower that the LLM's features pass through (the LLaVA families, Aya Vision, Qwen2-VL); "
                   "text-only prompts run neither, so text answers cannot move either way")
    p.add_argument("--anchor", type=Path, metavar="DIR",
                   help="pictures (no questions needed) whose visual tokens must stay as they are; with "
                   "--anchor-weight, also the retain pictures'")
    p.add_argument("--anchor-weight", type=float, default=d.anchor_weight, metavar="W",
                   help=f"weight of the anchor term: the relative distance of the edited visual tokens from the "
                   f"original's on the anchor and retain pictures (default {d.anchor_weight}; 0 turns it off)")
    p.add_argument("--other-answers", type=int, default=d.other_answers, metavar="M",
                   help="per forget picture and question, M other answers the folders give to the question: NPO again, "
                   "until the forgotten answer is no more likely than theirs on that picture (default "
                   f"{d.other_answers}: off; forgets more, keeps others less: see the README's trade-offs)")
    p.add_argument("--other-beta", type=float, default=d.other_beta, metavar="B",
                   help=f"beta of that term (default {d.other_beta}: its pressure stops near parity)")
    p.add_argument("--shard-llm", action="store_true",
                   help="under torchrun: shard the frozen LLM's decoder layers over the ranks (FSDP2), for models "
                   "too big for one device; the projector stays replicated")


def _config(args):
    from .config import Config

    return Config(method=args.method, steps=args.steps, lr=args.lr, beta=args.beta, retain_weight=args.retain_weight,
                  mask=args.mask, mask_threshold=args.mask_threshold, views=args.views, batch_size=args.batch_size, device=args.device,
                  seed=args.seed, holdout=not args.no_holdout, select=args.select_step, search=args.search,
                  shard_llm=args.shard_llm, scope=args.scope, anchor_weight=args.anchor_weight,
                  anchor_dir=str(args.anchor) if args.anchor else None, other_answers=args.other_answers,
                  other_beta=args.other_beta)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastunlearn", description="Erase a visual concept from a multimodal LLM checkpoint "
                                 "by updating only its vision-to-language projector.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("apply", help="erase what FORGET_DIR shows from CKPT")
    p.add_argument("ckpt", type=Path, metavar="CKPT", help="Hugging Face checkpoint folder (safetensors)")
    p.add_argument("forget", type=Path, nargs="+", metavar="FORGET_DIR",
                   help="pictures (and optional QA .jsonl) to forget; several folders (or a manifest file listing "
                   "them, one a line) are several erasure requests in one job")
    p.add_argument("--retain", type=Path, help="pictures (and optional QA .jsonl) that must keep working")
    p.add_argument("--out", type=Path, help="write a new checkpoint folder here (default: patch CKPT in place)")
    p.add_argument("--report", type=Path, help="report path (default: unlearning_report.json in the written checkpoint)")
    p.add_argument("--delta", type=Path, help="also save the weight delta here (apply it later with `patch`)")
    p.add_argument("--dry-run", action="store_true", help="run the job and report, write no checkpoint")
    _add_job_options(p)

    p = sub.add_parser("patch", help="apply a delta saved by `apply --delta`")
    p.add_argument("ckpt", type=Path, metavar="CKPT")
    p.add_argument("delta", type=Path, metavar="DELTA_FILE")

    p = sub.add_parser("verify", help="recompute metrics and the byte-level comparison of two checkpoints",
                       description="Exit status: 0 every check passed; 3 the byte proof failed (bytes other than the "
                       "connector's changed, headers differ, a file is missing or added); 4 a requested threshold (or "
                       "--min-relearn-steps) failed; "
                       "2 bad input.")
    p.add_argument("original", type=Path, metavar="ORIGINAL")
    p.add_argument("unlearned", type=Path, metavar="UNLEARNED")
    p.add_argument("forget", type=Path, metavar="FORGET_DIR")
    p.add_argument("--retain", type=Path)
    p.add_argument("--report", type=Path, help="write the JSON verification report here")
    p.add_argument("--html", type=Path, help="also write the report as a self-contained HTML page here")
    p.add_argument("--text", type=Path, help="text-only questions (.jsonl: question, answer) that must stay unchanged")
    p.add_argument("--no-probes", action="store_true", help="skip the relearning and linear-probe checks")
    p.add_argument("--json", action="store_true", help="print the verification report as JSON on stdout instead of the summary")
    p.add_argument("--max-forget-accuracy", type=float, metavar="F",
                   help="fail (exit 4) when forgotten pictures' exact-answer accuracy after is above F (0.3 = 30%%)")
    p.add_argument("--max-forget-choice-accuracy", type=float, metavar="F",
                   help="fail (exit 4) when forgotten pictures' multiple-choice accuracy after is above F")
    p.add_argument("--max-retain-drop", type=float, metavar="F",
                   help="fail (exit 4) when kept pictures' exact-answer accuracy drops by more than F (needs --retain)")
    p.add_argument("--max-text-nll-change", type=float, metavar="X",
                   help="fail (exit 4) when a text-only answer's NLL changes by more than X (needs --text)")
    p.add_argument("--min-relearn-steps", type=int, metavar="N",
                   help="fail (exit 4) when fine-tuning the connector on half the forget pictures names the forgotten "
                   "again on the other half in fewer than N steps (the attack's budget becomes at least N; "
                   "not with --no-probes)")
    p.add_argument("--confidence", type=float, metavar="C",
                   help="apply the accuracy thresholds and --max-retain-drop to the upper end of their C interval "
                   "(e.g. 0.95; Clopper-Pearson) instead of the measured value")
    p.add_argument("--scope", default="connector", metavar="connector|vision:K",
                   help="the tensors the job was allowed to change, as given to apply (default connector); any "
                        "other changed tensor fails the byte proof")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("report", help="summarise a report (apply's or verify's) and render it as HTML")
    p.add_argument("report", type=Path, metavar="REPORT.json")
    p.add_argument("--html", type=Path, metavar="OUT.html", help="write a self-contained HTML page here")

    p = sub.add_parser("convert", help="turn a benchmark's Hugging Face parquet files into forget / retain folders")
    p.add_argument("kind", choices=["mllmu-bench", "clear"], metavar="mllmu-bench|clear", help="which benchmark SRC holds")
    p.add_argument("src", type=Path, metavar="SRC", help="local copy of the dataset (its parquet files, any depth)")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="new or empty folder: one sub-folder per split")
    p.add_argument("--split", action="append", metavar="NAME", help="convert only this split (repeatable; default all)")

    p = sub.add_parser("evaluate", help="a benchmark's own metrics (MLLMU-Bench, CLEAR) of two checkpoints, as its paper tabulates them",
                       description="Scores ORIGINAL and UNLEARNED on the sets given (folders from `fastunlearn convert`) "
                       "with the benchmark's prompts; prints a row per set, a column per task, each cell before -> after.")
    p.add_argument("original", type=Path, metavar="ORIGINAL")
    p.add_argument("unlearned", type=Path, metavar="UNLEARNED")
    p.add_argument("--benchmark", required=True, choices=["mllmu-bench", "clear"], metavar="mllmu-bench|clear")
    p.add_argument("--forget", required=True, type=Path, metavar="DIR", help="the converted forget split")
    p.add_argument("--test", type=Path, metavar="DIR", help="the forget people on new pictures (MLLMU-Bench Test_Set; "
                   "only the forget set's people are scored)")
    p.add_argument("--retain", type=Path, metavar="DIR", help="the converted retain split")
    p.add_argument("--celebrity", type=Path, metavar="DIR", help="real people (MLLMU-Bench Retain_Set, CLEAR real_faces)")
    p.add_argument("--world", type=Path, metavar="DIR", help="CLEAR real_world")
    p.add_argument("--text", type=Path, metavar="FILE", help="text-only questions (convert's OUT_DIR/<split>.text.jsonl)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the table")
    p.add_argument("--report", type=Path, metavar="FILE", help="write the result as JSON here")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="greedy tokens per answer (default: the benchmark's, "
                   "50 for MLLMU-Bench, 300 for CLEAR; multiple choice: 5)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="prompts decoded together (default 16)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("demo", help="the embedded end-to-end example (small LLaVA, synthetic people)")
    p.add_argument("--workdir", type=Path, default=Path("fastunlearn-demo"), help="where to write (default ./fastunlearn-demo)")
    p.add_argument("--device", default="auto")
    return ap


def print_metrics(metrics: dict, heldout: dict | None = None) -> None:
    """Held-out pictures (never trained on) first: they are the figures that matter."""
    rows = [(f"{role}, held-out pictures", heldout[role]) for role in ("forget", "retain") if role in (heldout or {})]
    rows += [(f"{name}, training pictures", m) for name, m in metrics.items()]
    print(f"{'set':<28} {'items':>6} {'greedy acc before':>18} {'after':>8} {'answer NLL before':>18} {'after':>8}")
    for name, m in rows:
        b, a = m["before"], m["after"]
        print(f"{name:<28} {b['items']:>6} {b['greedy_accuracy']:>18.3f} {a['greedy_accuracy']:>8.3f} "
              f"{b['mean_token_nll']:>18.3f} {a['mean_token_nll']:>8.3f}")


def print_verify_metrics(metrics: dict) -> None:
    """The job's summary metrics of both checkpoints, each accuracy with its 95% interval."""
    def acc(m):
        low, high = m.get("greedy_accuracy_interval", (None, None))
        return f"{m['greedy_accuracy']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")

    print(f"{'set':<8} {'items':>6} {'greedy acc before [95% interval]':>34} {'after':>22} "
          f"{'answer NLL before':>18} {'after':>8}")
    for name, m in metrics.items():
        b, a = m["before"], m["after"]
        print(f"{name:<8} {b['items']:>6} {acc(b):>34} {acc(a):>22} {b['mean_token_nll']:>18.3f} {a['mean_token_nll']:>8.3f}")


def cmd_apply(args) -> int:
    from . import distributed
    from .applying import apply

    # under torchrun, rank 0 alone prints (every rank prints its own error line, which
    # torchrun's SIGTERM to the survivors must not cut short)
    distributed.HOLD_SIGTERM_AFTER_FAILURE = True
    quiet = distributed.launched_by_torchrun() and os.environ.get("RANK") != "0"
    report = apply(args.ckpt, args.forget, args.retain, out=args.out, report_path=args.report, delta_path=args.delta,
                   dry_run=args.dry_run, config=_config(args), log=(lambda *a: None) if quiet else print)
    if quiet:
        return 0
    print_metrics(report["metrics"], report.get("heldout"))
    for i, r in enumerate(report.get("requests", [])):
        print(f"request {i + 1} (folder sha256 {r['folder_sha256'][:12]}): ", end="")
        m = r["metrics"]["forget"]
        print(f"forget greedy accuracy {m['before']['greedy_accuracy']:.3f} -> {m['after']['greedy_accuracy']:.3f} "
              f"over {m['before']['items']} items")
    d = report.get("distributed", {})
    if d.get("world_size", 1) > 1:
        print(f"ranks: {d['world_size']} ({d['backend']}); projector identical on all ranks: "
              f"{d.get('projector_identical_on_all_ranks')}")
    changed = report["changed_tensors"]
    n = sum(c["elements_changed"] for c in changed)
    room = report["byte_proof"].get("may_change") or []
    print(f"changed {len(changed)} tensors ({', '.join(room)}), {n} elements, {report['byte_proof']['bytes_written']} "
          f"bytes in byte ranges; all other bytes unchanged: {report['byte_proof']['all_other_bytes_unchanged']}")
    if args.dry_run:
        print("dry run: no checkpoint written")
    else:
        print(f"written: {report['checkpoint']['written_to']}")
    if "report_path" in report:
        print(f"report: {report['report_path']}")
    if args.delta:
        print(f"delta: {args.delta}")
    return 0


def cmd_patch(args) -> int:
    from .patching import patch

    result = patch(args.ckpt, args.delta)
    print(f"{result['status']}: {len(result['tensors'])} tensors, {result['bytes_written']} bytes written to {args.ckpt}")
    return 0


def cmd_verify(args) -> int:
    from .html_report import render_html, summary_lines
    from .journal import write_file_atomic
    from .checks import exit_status
    from .verification import verify

    result = verify(args.original, args.unlearned, args.forget, args.retain, device=args.device, text_path=args.text,
                    probes=not args.no_probes, max_forget_accuracy=args.max_forget_accuracy,
                    max_forget_choice_accuracy=args.max_forget_choice_accuracy, max_retain_drop=args.max_retain_drop,
                    max_text_nll_change=args.max_text_nll_change, min_relearn_steps=args.min_relearn_steps,
                    confidence=args.confidence, scope=args.scope)
    if args.report:
        write_file_atomic(args.report, (json.dumps(result, indent=2) + "\n").encode())
    if args.html:
        write_file_atomic(args.html, render_html(result).encode())
    if args.json:
        print(json.dumps(result, indent=2))
        return exit_status(result)
    print_verify_metrics(result["metrics"])
    print()
    print("\n".join(summary_lines(result)))
    for c in result["checks"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['check']}" + (f" ({c['detail']})" if c["detail"] else ""))
    for path, what in ((args.report, "report"), (args.html, "html")):
        if path:
            print(f"{what}: {path}")
    failed = [c["check"] for c in result["checks"] if not c["passed"]]
    if failed:
        print(f"fastunlearn: verify failed: {'; '.join(failed)}", file=sys.stderr)
    return exit_status(result)


def cmd_report(args) -> int:
    from .html_report import load_report, render_html, summary_lines

    report = load_report(args.report)
    print("\n".join(summary_lines(report)))
    if args.html:
        from .journal import write_file_atomic

        write_file_atomic(args.html, render_html(report).encode())
        print(f"html: {args.html}")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    result = convert(args.kind, args.src, args.out, args.split)
    for name, c in result["splits"].items():
        note = f"; {c['pictures_without_qa']} pictures without QA get the default questions" if c["pictures_without_qa"] else ""
        note += f"; {c['skipped_questions']} malformed questions skipped" if c["skipped_questions"] else ""
        kinds = f" ({c['generation']} generation, {c['choice']} multiple choice, {c['cloze']} fill-in)" if c["choice"] or c["cloze"] else ""
        print(f"{name}: {c['pictures']} pictures, {c['qa']} QA lines{kinds}, {c['people']} people ({c['rows']} rows{note})")
        if c["text_qa"]:
            print(f"{name}: {c['text_qa']} text-only questions in {name}.text.jsonl (for verify --text / evaluate --text)")
    print(f"written: {result['out']}")
    return 0


def cmd_evaluate(args) -> int:
    from .benchmark import evaluate_benchmark, table_lines
    from .journal import write_file_atomic

    if args.report and not args.report.parent.is_dir():  # before hours of decoding, not after
        raise UserError(f"{args.report.parent}: folder does not exist (give --report a path in an existing folder)")
    result = evaluate_benchmark(args.original, args.unlearned, args.benchmark, args.forget, test=args.test,
                                retain=args.retain, celebrity=args.celebrity, world=args.world, text=args.text,
                                device=args.device, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    if args.report:
        try:
            write_file_atomic(args.report, (json.dumps(result, indent=2) + "\n").encode())
        except OSError as e:
            raise UserError(f"{args.report}: cannot write the report ({e.strerror or e})") from None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("\n".join(table_lines(result)))
    if args.report:
        print(f"report: {args.report}")
    return 0


def cmd_demo(args) -> int:
    from .worlds.demo import run_demo

    run_demo(args.workdir, device=args.device, log=print)
    return 0


def quiet_transformers() -> None:
    """transformers' load bars and fallback notices are noise in a job's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    quiet_transformers()
    code = _run(args)
    from .distributed import launched_by_torchrun

    if launched_by_torchrun():
        # gloo's threads can abort the interpreter's teardown once a peer has gone ("terminate called
        # without an active exception", exit -6): every file is written and closed, so leave without it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args) -> int:
    try:
        return {"apply": cmd_apply, "patch": cmd_patch, "verify": cmd_verify, "report": cmd_report,
                "demo": cmd_demo, "convert": cmd_convert, "evaluate": cmd_evaluate}[args.command](args)
    except UserError as e:
        print(f"fastunlearn: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("fastunlearn: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # under torchrun, a rank that raises says so in one line (its peers stop in one line
        # too); FASTUNLEARN_TRACEBACK=1 shows the traceback instead
        from .distributed import launched_by_torchrun

        if not launched_by_torchrun() or os.environ.get("FASTUNLEARN_TRACEBACK"):
            raise
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"fastunlearn: error: rank {os.environ.get('RANK')}: {e.__class__.__name__}: {reason}; nothing was written "
              "(FASTUNLEARN_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
