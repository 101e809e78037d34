"""scripts/gpu-smoke.sh on a machine without a usable GPU (this one, CI): it must stop at once, exit 2 and
say why, before building a model or starting anything. (What it checks on a GPU is in its header and in
docs/operations.md; it cannot run here.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "gpu-smoke.sh"

pytestmark = pytest.mark.integration  # runs the script (a subprocess)


def _run(*args: str, path_dir: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    if path_dir is not None:
        env["PATH"] = f"{path_dir}{os.pathsep}{env['PATH']}"
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    return proc, time.monotonic() - t0


def test_the_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(SCRIPT, os.X_OK)


@pytest.mark.parametrize("mode", [[], ["--learner-only"]])
def test_without_a_gpu_it_fails_fast_and_says_why(mode, tmp_path):
    bare = tmp_path / "bin"  # a PATH entry without nvidia-smi in front changes nothing: look it up as it is
    bare.mkdir()
    proc, elapsed = _run(*mode, path_dir=bare)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "gpu-smoke: FAIL" in out and ("nvidia-smi" in out or "sees no CUDA GPU" in out), out
    assert "PASS" not in out and "step 1" not in out, out  # nothing past the GPU check ran
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_a_driver_but_no_gpu_for_torch_fails_at_torchs_check(tmp_path):
    """nvidia-smi answers (a driver is installed) but torch sees no GPU (CUDA_VISIBLE_DEVICES='' here, or a
    CPU-only torch build): the second gate names what torch sees. The nvidia-smi on PATH is a script that
    prints what `nvidia-smi -L` prints, to reach that gate on a machine without a driver."""
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    proc, elapsed = _run("--learner-only", path_dir=fake)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "sees no CUDA GPU although nvidia-smi lists: GPU 0: NVIDIA H100" in out, out
    assert "CUDA_VISIBLE_DEVICES=''" in out, out
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_an_unknown_argument_is_refused():
    proc, _ = _run("--gpus=2")
    assert proc.returncode == 2 and "unknown argument '--gpus=2'" in proc.stderr, proc.stderr


def test_the_learner_checks_refuse_to_run_without_cuda():
    """scripts/gpu_smoke_learner.py, run on its own, says what torch sees instead of failing later."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_smoke_learner.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "torch sees no CUDA GPU" in proc.stderr, proc.stderr


def test_the_learner_rank_check_runs_on_cpu(tmp_path, capsys):
    """Check 4 of the GPU smoke (duet-rl's own LearnerRank, no Ray) dry-run on the CPU with gloo: ZeRO-0
    and ZeRO-3 with every parameter partitioned take the same three steps (gradient norms and mean
    log-probs within 1e-4), and a checkpoint of step 2 redoes step 3 the same. It pins a bug this check
    found: at ZeRO-0 in fp32 DeepSpeed records no gradient norm, and train/grad_norm was logged as 0."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_smoke_learner
    finally:
        sys.path.remove(str(REPO / "scripts"))
    from learner.tiny_model import build_model

    build_model(str(tmp_path / "model"), seed=0)
    failures: list[str] = []
    gpu_smoke_learner.check_learner_rank(
        str(tmp_path / "model"),
        str(tmp_path),
        failures,
        device="cpu",
        variants=((0, "float32"), (3, "float32")),
    )
    out = capsys.readouterr().out
    assert failures == [], out
    assert out.count("PASS") == 3 and "LearnerRank ZeRO 0, 3 (fp32) agree" in out, out
