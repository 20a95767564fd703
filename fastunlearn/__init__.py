"""fastunlearn: erase a visual concept (a face, a logo) from a multimodal LLM checkpoint by updating only
its vision-to-language connector, keep its textual knowledge, and prove what changed.

The public API is what this module exports; everything else may change.

    import fastunlearn

    report = fastunlearn.apply("llava-ckpt", "forget/", "retain/", out="llava-unlearned",
                               config=fastunlearn.Config(steps=100, seed=0))
    result = fastunlearn.verify("llava-ckpt", "llava-unlearned", "forget/", "retain/",
                                max_forget_accuracy=0.3, max_retain_drop=0.02)
    assert result["passed"], [c for c in result["checks"] if not c["passed"]]
    fastunlearn.patch("another-copy-of-llava-ckpt", "delta.safetensors")   # a delta saved by apply
    table = fastunlearn.evaluate_benchmark("llava-ckpt", "llava-unlearned", "mllmu-bench", "out/forget_5",
                                           test="out/Test_Set", retain="out/retain_95")   # the benchmark's metrics

Reports are plain dicts (JSON-serialisable). Bad input raises `UserError` (one line, what is wrong
and what to do) before anything is written; its subclasses tell refusals apart (errors.py). Notes
go to the "fastunlearn" logger, or to the `log` callback given; progress bars show only on a
terminal.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "apply": "applying",
    "verify": "verification",
    "patch": "patching",
    "convert": "convert",
    "evaluate_benchmark": "benchmark",
    "Config": "config",
    "UserError": "errors",
    "WrongCheckpoint": "errors",
    "CheckpointChanged": "errors",
    "CheckpointBusy": "errors",
    "WriteFailed": "errors",
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    """Import on first use: `import fastunlearn` (and the CLI's --help) stays light, torch loads on demand."""
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'fastunlearn' has no attribute {name!r}")
