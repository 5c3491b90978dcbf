"""The parts of sleep_trl.generation.vllm_cpu that need no engine: checkpoint-format weights of plain and PEFT models,
KV-cache sizing, and the error when vLLM is missing. Fast; runs in every environment."""

import copy
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sleep_trl.generation.vllm_cpu import default_kv_cache_bytes, model_weights


@pytest.fixture(scope="module")
def tiny_qwen2(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir("vllm-weights-qwen2", seed=5), dtype=torch.float32)


def test_plain_model_weights_are_its_parameters(tiny_qwen2):
    ours = dict(model_weights(tiny_qwen2))
    ref = dict(tiny_qwen2.named_parameters())
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_peft_weights_are_merged_under_base_names_and_unmerged_after(tiny_qwen2):
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(tiny_qwen2)
    base_names = {k: v.clone() for k, v in base.named_parameters()}
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                 init_lora_weights=False))
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = peft_model(x).logits

    merged = {k: v.clone() for k, v in model_weights(peft_model)}
    assert merged.keys() == base_names.keys()  # adapter tensors skipped, wrappers stripped
    # Hand-computed merge for one targeted weight: W + (alpha / r) * B @ A.
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = (8 / 4) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(merged[name], base_names[name] + delta, atol=1e-6)
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged[untouched], base_names[untouched])
    # The same merge as PEFT's own `merge_and_unload`, everywhere.
    reference = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    assert [k for k in reference if not torch.allclose(merged[k], reference[k], atol=1e-6)] == []

    # Out of place: the frozen base weights are bit-identical after the walk.
    live = dict(model_weights(peft_model, merge_adapters=False))
    assert all(torch.equal(live[k], base_names[k]) for k in base_names)
    with peft_model.disable_adapter():  # adapters off: nothing is added
        assert all(torch.equal(t, base_names[k]) for k, t in model_weights(peft_model))

    # The teacher view: base weights only.
    base_view = dict(model_weights(peft_model, merge_adapters=False))
    assert all(torch.equal(base_view[k], base_names[k]) for k in base_names)
    # Unmerged again after iteration: the PEFT model computes what it did.
    with torch.no_grad():
        assert torch.allclose(peft_model(x).logits, before, atol=1e-6)
    assert not any(m.merged for m in peft_model.modules() if hasattr(m, "merged"))


def test_default_kv_cache_bytes_hand_computed(tiny_qwen2):
    # tiny Qwen2: 2 layers x 1 KV head x head dim 32 x (K and V) x 4 bytes = 512 bytes per token.
    per_token = 2 * 2 * 1 * 32 * 4
    assert default_kv_cache_bytes(tiny_qwen2.config, 128, 4, torch.float32) == per_token * (128 * 4 + 256)
    # max_model_len=None: the model's max_position_embeddings (512).
    assert default_kv_cache_bytes(tiny_qwen2.config, None, 4, torch.float32) == per_token * (512 * 4 + 256)
    # A SmolLM2-135M-shaped config: 8 full-length sequences would need 2.8 GiB, capped at 1 GiB (+ slack).
    smol = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                       num_hidden_layers=30, max_position_embeddings=8192)
    per_token = 2 * 30 * 3 * 64 * 2
    assert default_kv_cache_bytes(smol, None, 8, torch.bfloat16) == 2**30 + per_token * 256


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_a_clear_error_before_any_work(tmp_path):
    from sleep_trl.generation.vllm_cpu import TeacherEngine

    with pytest.raises(ImportError, match="setup_vllm.sh"):
        TeacherEngine(tmp_path / "does-not-matter")


def test_dora_falls_back_to_peft_merge(tiny_qwen2):
    """DoRA is not an additive delta: the walk uses PEFT's own merge/unmerge and still yields the merged weights."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(tiny_qwen2), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                                       init_lora_weights=False))
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = peft_model(x).logits
    merged = {k: v.clone() for k, v in model_weights(peft_model)}
    reference = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    assert merged.keys() == reference.keys()
    assert [k for k in reference if not torch.allclose(merged[k], reference[k], atol=1e-6)] == []
    with torch.no_grad():
        assert torch.allclose(peft_model(x).logits, before, atol=1e-5)
