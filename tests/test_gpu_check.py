"""scripts/gpu_check.sh end to end on CPU at a tiny size (no CUDA needed to import or run it there)."""
import os
import subprocess

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # the benchmark and the trainer in subprocesses


def test_gpu_check_runs_on_cpu_at_a_tiny_size_and_writes_its_table(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--tiny", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    for variant in ("frozen base", "LoRA r1", "PEFT WaveFT", "structured WaveFT"):
        assert f"| {variant} |" in report
    assert "| steps | 2 |" in report and "| adapted_layers |" in report
    assert "sampled_addmm vs gather + vecdot" in report and "| all 64 layers (sum) |" in report
    for base in ("none", "int8", "nf4"):  # the quantized step, and the estimate against the measured step
        rows = 3 if base == "none" else 2  # the bf16 base's estimate also with trained text encoders
        assert sum(line.startswith(f"| {base} |") for line in report.splitlines()) == rows
    assert "estimate / measured" in report and "+ text encoders" in report
    # Each stage left its table and its log; the model, the run and the subject stayed out of the folder.
    stages = ("build", "step", "kernels", "quantized", "estimate", "train")
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_check.md", "summary.log", *(f"{s}.log" for s in stages),
                                                    *(f"{s}.md" for s in stages[1:])}


def test_gpu_mode_refuses_a_machine_without_cuda(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "error: no CUDA device" in result.stderr
