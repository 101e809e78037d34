"""Shared fixtures: a tiny model built offline once per session, and a local Ray for integration tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One cache folder for every test (and the subprocesses they start): the model is built once."""
    return Path(os.environ.get("DUET_TEST_MODEL_CACHE") or tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def tiny_model(model_cache) -> Path:
    from cluster.config import Config
    from learner.tiny_model import ensure_tiny_model

    cfg = Config()  # the same key as `duet train`'s default, so subprocesses reuse the build
    return ensure_tiny_model(model_cache, cfg.model.warm_start_steps, cfg.data.synthetic_max_operand, seed=0)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def duet_cmd(*args: str) -> list[str]:
    """`duet ...` through the interpreter running the tests (works without the console script on PATH)."""
    return [sys.executable, "-m", "cluster.cli", *args]
