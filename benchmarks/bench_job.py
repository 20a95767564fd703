"""End-to-end erasure benchmark: fastunlearn's job against the straightforward baseline
(benchmarks/baseline.py), same data, same objective, same number of steps, in one run.

    python -m pytest benchmarks/bench_job.py --benchmark-only --benchmark-group-by=group

CPU: the demo LLaVA (synthetic people, 0.23 M parameters) and "LLaVA-mini", random fp32 weights
shaped like the real thing at CPU scale (8-layer ViT at 112 px = 64 image tokens, 4-layer LLM,
vocab 32064). CUDA: a LLaVA-1.5-7B-sized model (CLIP-L/336 tower, Llama-2-7B LLM, vocab 32064)
built from its config with random bf16 weights (FASTUNLEARN_BENCH_7B_LAYERS sets its LLM depth,
default 32). Answers are the people's names from the demo world's folders in every case.
pytest-benchmark prints each row's time relative to the fastest in its group; peak memory and
the speed-up are in extra_info (and in the --benchmark-json output).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from baseline import run_baseline  # noqa: E402

from fastunlearn.worlds import people as world  # noqa: E402
from fastunlearn.data import read_folder  # noqa: E402
from fastunlearn.config import Config  # noqa: E402
from fastunlearn.job import unlearn  # noqa: E402

CPU_STEPS, MINI_STEPS, GPU_STEPS = 40, 10, 10
RESULTS: dict = {}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_peak_mb(variant: str, ckpt: Path, forget: Path, retain: Path, steps: int = 0) -> float:
    """Peak RSS the job adds, measured in a fresh process (a process that already ran another
    variant reuses freed heap and would under-report)."""
    steps = steps or CPU_STEPS
    out = subprocess.run([sys.executable, __file__, variant, str(ckpt), str(forget), str(retain), str(steps)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def run_measured(benchmark, fn, device: torch.device, group_key: str, name: str, cpu_peak=None, rounds=5):
    """Time `fn` with pytest-benchmark; record the peak memory it adds (GPU: allocated; CPU: RSS,
    from `cpu_peak`, a separate fresh process)."""
    peaks = []

    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)

    benchmark.pedantic(once, rounds=rounds if device.type == "cpu" else 1, iterations=1)
    peak = max(peaks) if peaks else cpu_peak()
    entry = RESULTS.setdefault(group_key, {})
    entry[name] = {"median_s": benchmark.stats.stats.median, "peak_mb": peak}
    benchmark.extra_info.update(peak_memory_mb=round(peak, 1), device=str(device))
    if "baseline" in entry and name != "baseline":
        base = entry["baseline"]
        benchmark.extra_info["speedup_vs_baseline"] = round(base["median_s"] / entry[name]["median_s"], 3)
        benchmark.extra_info["memory_ratio_vs_baseline"] = round(entry[name]["peak_mb"] / max(base["peak_mb"], 1e-9), 3)


def cpu_job(variant: str, ckpt, forget, retain, steps: int = 0):
    """The work of one CPU variant, as a no-argument function."""
    cfg = Config(steps=steps or CPU_STEPS, device="cpu", views=0, mask="none" if variant.endswith("nomask") else "fisher")
    if variant == "baseline":
        items_f, items_r = read_folder(forget), read_folder(retain)
        return lambda: run_baseline(ckpt, items_f, items_r, cfg.steps, cfg.lr, cfg.beta, cfg.batch_size,
                                    torch.device("cpu"))
    return lambda: unlearn(ckpt, forget, retain, cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-world")
    forget_people, others = (1, 4), (0, 2, 3, 5, 6, 7)
    world.write_folder(root / "forget", forget_people, 6, seed=101)
    world.write_folder(root / "retain", others, 3, seed=202)
    return world.demo_assets_dir() / "llava-people", root / "forget", root / "retain"


VARIANTS = ["baseline", "fastunlearn", "fastunlearn-nomask"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_e2e_cpu_demo_llava(benchmark, demo_world, variant):
    benchmark.group = f"e2e cpu: demo LLaVA, {CPU_STEPS} steps"
    run_measured(benchmark, cpu_job(variant, *demo_world), torch.device("cpu"), "cpu", variant,
                 cpu_peak=lambda: cpu_peak_mb(variant, *demo_world))


def build_llava(folder: Path, image_size: int, patch: int, vision: tuple, text: tuple, device: str, dtype,
                vocab: int = 32064, shard: str = "10GB") -> Path:
    """A LLaVA-1.5-style checkpoint with random weights and the demo's tokenizer and processor.

    vision / text: (hidden, intermediate, layers, heads); the LLM's vocabulary is 32064 as in
    LLaVA-1.5 (the demo tokenizer uses the first few hundred ids)."""
    from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vh, vi, vl, va = vision
    th, ti, tl, ta = text
    processor = AutoProcessor.from_pretrained(world.demo_assets_dir() / "llava-people")
    processor.image_processor.size = {"shortest_edge": image_size}
    processor.image_processor.crop_size = {"height": image_size, "width": image_size}
    processor.patch_size = patch
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vh, intermediate_size=vi, num_hidden_layers=vl, num_attention_heads=va,
                                       image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(hidden_size=th, intermediate_size=ti, num_hidden_layers=tl, num_attention_heads=ta,
                                num_key_value_heads=ta, vocab_size=vocab, max_position_embeddings=4096),
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.save_pretrained(folder, max_shard_size=shard)
    processor.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


@pytest.fixture(scope="module")
def llava_mini(tmp_path_factory, demo_world):
    """CPU-sized but shaped like the real thing: 64 image tokens, an 8-layer ViT, vocab 32064."""
    folder = build_llava(tmp_path_factory.mktemp("llava-mini"), 112, 14, (384, 1536, 8, 6), (512, 1376, 4, 8),
                         "cpu", torch.float32)
    return folder, demo_world[1], demo_world[2]


@pytest.mark.parametrize("variant", VARIANTS)
def test_e2e_cpu_llava_mini(benchmark, llava_mini, variant):
    benchmark.group = f"e2e cpu: LLaVA-mini (ViT 8x384 @112, LLM 4x512, vocab 32064), {MINI_STEPS} steps"
    run_measured(benchmark, cpu_job(variant, *llava_mini, steps=MINI_STEPS), torch.device("cpu"), "cpu-mini",
                 variant, cpu_peak=lambda: cpu_peak_mb(variant, *llava_mini, steps=MINI_STEPS), rounds=1)


@pytest.fixture(scope="module")
def llava_7b(tmp_path_factory, demo_world):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the 7B-sized run is a GPU benchmark")
    layers = int(os.environ.get("FASTUNLEARN_BENCH_7B_LAYERS", "32"))
    folder = build_llava(tmp_path_factory.mktemp("llava7b"), 336, 14, (1024, 4096, 24, 16), (4096, 11008, layers, 32),
                         "cuda", torch.bfloat16)
    return folder, demo_world[1], demo_world[2]


@pytest.mark.parametrize("variant", VARIANTS)
def test_e2e_cuda_llava_7b(benchmark, llava_7b, variant):
    benchmark.group = "e2e cuda: LLaVA-1.5-7B-sized, 10 steps"
    ckpt, forget, retain = llava_7b
    device = torch.device("cuda")
    cfg = Config(steps=GPU_STEPS, device="cuda", views=0, batch_size=8, fisher_samples=8, max_new_tokens=8,
                 mask="none" if variant.endswith("nomask") else "fisher")
    if variant == "baseline":
        items_f, items_r = read_folder(forget), read_folder(retain)
        for it in items_f + items_r:
            it.answer = it.answer or "unknown"
        fn = lambda: run_baseline(ckpt, items_f, items_r, cfg.steps, cfg.lr, cfg.beta, cfg.batch_size, device,  # noqa: E731
                                  torch.bfloat16)
    else:
        fn = lambda: unlearn(ckpt, forget, retain, cfg, log=lambda *_: None)  # noqa: E731
    run_measured(benchmark, fn, device, "cuda", variant)


if __name__ == "__main__":  # one CPU variant in this fresh process: print the peak RSS it added, in MB
    import transformers

    transformers.logging.set_verbosity_error()
    variant, ckpt, forget, retain = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    job = cpu_job(variant, ckpt, forget, retain, int(sys.argv[5]))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_mb("VmRSS")
    job()
    print(_rss_mb("VmHWM") - before)
