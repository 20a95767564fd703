"""The repository's layout must not shadow other distributions from the repository root.

`python -m pytest`, `python -m fastunlearn`, `torchrun -m ...` and a notebook opened in the
repository all put the current directory first on sys.path. The top-level `kernels/` folder has
no `__init__.py`, so there it is at most a PEP 420 namespace portion, which an installed regular
package of the same name (Hugging Face's `kernels`, which transformers >= 5.25 imports with its
model classes) always wins over; the fused kernels are reached only as `fastunlearn.kernels`
(`fastunlearn/kernels` links to `../kernels` in the checkout; the wheel holds the files).
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.util, json, sys
from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.utils.import_utils import is_kernels_available
import fastunlearn.kernels.projector, fastunlearn.kernels.linear_nll, fastunlearn.kernels.masked_adamw
spec = importlib.util.find_spec("kernels")
print(json.dumps({"sys_path_0": sys.path[0], "kernels_origin": spec.origin if spec else None,
                  "kernels_locations": list(spec.submodule_search_locations or []) if spec else [],
                  "hf_kernels_available": is_kernels_available(),
                  "projector": fastunlearn.kernels.projector.__file__}))
"""


def hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_repository_root_shadows_nothing():
    import json

    run = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["sys_path_0"] in ("", str(ROOT)), seen  # the repository root really was first on sys.path
    assert Path(seen["projector"]).resolve() == ROOT / "kernels" / "projector.py"
    if hf_kernels_installed():
        assert seen["kernels_origin"], seen
        assert Path(seen["kernels_origin"]).resolve().parent != ROOT / "kernels", seen
        assert str(ROOT / "kernels") not in seen["kernels_locations"], seen
    else:  # only our namespace portion is found, and transformers must not take it for the package
        assert seen["kernels_origin"] in (None, "namespace"), seen
        assert not seen["hf_kernels_available"], seen


def test_python_m_fastunlearn_from_the_repository_root():
    run = subprocess.run([sys.executable, "-m", "fastunlearn", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "apply" in run.stdout


def test_no_top_level_package_named_kernels():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow the `kernels` package"
    assert (ROOT / "fastunlearn" / "kernels").resolve() == ROOT / "kernels"
