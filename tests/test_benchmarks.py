"""The GPU benchmarks in scripts/ (their figures are the GPU's): on a machine without one they stop at once with a
message, before any work, and their --help describes them."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["bench_lm_head.py", "bench_cross_entropy.py", "bench_sample.py"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a CUDA GPU")
@pytest.mark.parametrize("script", SCRIPTS)
def test_without_a_gpu_the_benchmark_says_so(script):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script)], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().endswith("error: this benchmark needs a CUDA GPU")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_the_output_folder(script):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--out_dir" in run.stdout and "results/ for the repo's own figures" in run.stdout
