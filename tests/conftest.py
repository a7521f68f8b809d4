"""Shared fixtures: offline environment, the tiny model, shapes data, one shared vLLM engine (others kept alive)."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs on the tiny models (run in CI too)")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def tiny():
    from models import load_policy
    return load_policy("tiny")


@pytest.fixture(scope="session")
def vllm_engine(tiny):
    """One in-process engine for the whole session (start-up costs seconds; sharing it keeps CI short)."""
    from rollout import VLLMRollout
    return VLLMRollout("tiny", tiny[1], max_model_len=1024, max_num_seqs=32)


@pytest.fixture(scope="session")
def keep_engine():
    """Holds every other in-process vLLM engine a test makes until the session ends: an engine that is garbage-collected
    tears down vLLM's process-wide parallel groups, and every engine still alive then fails ("pipeline model parallel
    group is not initialized")."""
    engines = []
    return engines.append


@pytest.fixture(scope="session")
def math_model(tmp_path_factory):
    """The tiny model after a supervised warm start on shapes counting (it boxes an answer, right by chance)."""
    import train
    out = str(tmp_path_factory.mktemp("sftmath") / "run")
    train.main(train.Config(algo="sft", task="math", out_dir=out, sft_steps=150, seed=0))
    return os.path.join(out, "final")
