"""Growth operators on tiny Llama / Qwen2: the grown model computes the same function, saves and reloads, and its
clones really separate under training (width) or its new blocks start as the identity (depth)."""

from __future__ import annotations

import pytest
import torch

from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory, grow_depth, grow_width
from sleep_trl.tiny import build_model

ARCHS = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def input_ids(tiny_tokenizer):
    torch.manual_seed(2)
    return torch.randint(0, len(tiny_tokenizer), (2, 12))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def halves(model, ids):
    """Last hidden state before the final norm, split into the two clones."""
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[-2]
    d = h.shape[-1] // 2
    return h[..., :d], h[..., d:]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_grow_width_preserves_logits_and_reloads(tiny_tokenizer, input_ids, arch, tied, tmp_path):
    from transformers import AutoModelForCausalLM

    small = build_model(tiny_tokenizer, arch=arch, num_key_value_heads=1, tie_word_embeddings=tied).eval()
    ref = logits(small, input_ids)
    big = grow_width(small, factor=2, noise_std=0.05).eval()
    c = big.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        128, 256, 4, 2, 32)
    big_params = dict(big.named_parameters())
    for name, p in small.named_parameters():
        scale = 4 if ".layers." in name and p.dim() == 2 else 2  # block matrices grow both ways
        assert big_params[name].numel() == scale * p.numel(), name
    torch.testing.assert_close(logits(big, input_ids), ref, atol=1e-4, rtol=0)
    assert (big.lm_head.weight is big.model.embed_tokens.weight) == tied
    assert torch.equal(greedy(big, input_ids), greedy(small, input_ids))  # KV cache path agrees too
    big.save_pretrained(tmp_path / "big")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "big").eval()
    torch.testing.assert_close(logits(again, input_ids), ref, atol=1e-4, rtol=0)
    # the noise is really there (it cancels only because the input copies are equal)
    w = big.model.layers[0].mlp.gate_proj.weight
    assert not torch.allclose(w[:, :64], w[:, 64:], atol=1e-6)
    assert small.config.hidden_size == 64  # the source is untouched


def test_grow_width_factor_three(tiny_tokenizer, input_ids):
    small = build_model(tiny_tokenizer, arch="qwen2").eval()
    big = grow_width(small, factor=3, noise_std=0.02)
    assert big.config.hidden_size == 192 and big.config.num_attention_heads == 6
    torch.testing.assert_close(logits(big, input_ids), logits(small, input_ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_grow_width_noise_breaks_the_symmetry(tiny_tokenizer, input_ids, arch):
    small = build_model(tiny_tokenizer, arch=arch).eval()
    finals = {}
    for noise in (0.0, 0.05):
        big = grow_width(small, factor=2, noise_std=noise)
        a, b = halves(big, input_ids)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # identical clones at init, noise or not
        opt = torch.optim.SGD(big.parameters(), lr=0.5)
        big.train()
        for _ in range(4):
            big(input_ids, labels=input_ids).loss.backward()
            opt.step()
            opt.zero_grad()
        big.eval()
        a, b = halves(big, input_ids)
        finals[noise] = (a - b).abs().max().item()
        e = big.model.embed_tokens.weight
        finals[(noise, "emb")] = (e[:, :64] - e[:, 64:]).abs().max().item()
    assert finals[0.0] < 1e-5 and finals[(0.0, "emb")] < 1e-5  # without noise gradient descent keeps the clones
    assert finals[0.05] > 1e-3 and finals[(0.05, "emb")] > 1e-4  # with it, they move apart


@pytest.mark.parametrize("arch", ARCHS)
def test_grow_depth_adds_identity_blocks(tiny_tokenizer, input_ids, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    small = build_model(tiny_tokenizer, arch=arch, num_hidden_layers=3).eval()
    ref = logits(small, input_ids)
    deep = grow_depth(small, 2).eval()
    assert deep.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in deep.model.layers] == list(range(5))
    if arch == "qwen2":
        assert len(deep.config.layer_types) == 5
    torch.testing.assert_close(logits(deep, input_ids), ref, atol=1e-5, rtol=0)
    assert torch.equal(greedy(deep, input_ids), greedy(small, input_ids))
    # LLaMA-Pro spread: new blocks after original layers 0 and 2 -> positions 1 and 4; copies of their source
    for new, src in ((1, 0), (4, 2)):
        layer = deep.model.layers[new]
        assert torch.count_nonzero(layer.self_attn.o_proj.weight) == 0
        assert torch.count_nonzero(layer.mlp.down_proj.weight) == 0
        assert torch.equal(layer.mlp.gate_proj.weight, small.model.layers[src].mlp.gate_proj.weight)
    assert torch.equal(deep.model.layers[2].mlp.down_proj.weight, small.model.layers[1].mlp.down_proj.weight)
    deep.save_pretrained(tmp_path / "deep")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "deep").eval()
    torch.testing.assert_close(logits(again, input_ids), ref, atol=1e-5, rtol=0)
    # new blocks learn (their zeroed outputs receive gradient)
    deep.train()
    deep(input_ids, labels=input_ids).loss.backward()
    assert deep.model.layers[1].self_attn.o_proj.weight.grad.abs().sum() > 0


def test_grow_depth_positions_and_errors(tiny_tokenizer, input_ids):
    small = build_model(tiny_tokenizer, arch="llama").eval()
    deep = grow_depth(small, positions=[1, 1, 0])
    assert deep.config.num_hidden_layers == 5
    torch.testing.assert_close(logits(deep, input_ids), logits(small, input_ids), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        grow_depth(small, positions=[2])
    with pytest.raises(ValueError, match="2 positions given"):
        grow_depth(small, 3, positions=[0, 1])
    with pytest.raises(ValueError, match="num_new_layers"):
        grow_depth(small)


def test_growth_refuses_unsupported_inputs(tiny_tokenizer):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                                          num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="not supported"):
        grow_width(neox)
    small = build_model(tiny_tokenizer, arch="llama")
    with pytest.raises(ValueError, match="factor"):
        grow_width(small, factor=1)
    attach_memory(small, MemoryConfig(levels=[LevelConfig("fast", 1, 4)]))
    with pytest.raises(ValueError, match="continuum memory attached"):
        grow_depth(small, 1)


@pytest.mark.slow
def test_smollm2_growth_preserves_logits(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tok(["The capital of France is"], return_tensors="pt").input_ids
    ref = logits(model, ids)
    wide = grow_width(model, factor=2).eval()  # 9 -> 18 query heads, 3 -> 6 kv heads, tied embeddings
    assert wide.config.hidden_size == 1152 and wide.lm_head.weight is wide.model.embed_tokens.weight
    torch.testing.assert_close(logits(wide, ids), ref, atol=1e-4, rtol=0)
    del wide
    deep = grow_depth(model, 6).eval()
    assert deep.config.num_hidden_layers == 36
    torch.testing.assert_close(logits(deep, ids), ref, atol=1e-5, rtol=0)


def test_qwen3_per_head_norms(input_ids):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    small = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial q_norm / k_norm weights
        for layer in small.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    ref = logits(small, input_ids)
    torch.testing.assert_close(logits(grow_width(small, 2), input_ids), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(grow_depth(small, 1), input_ids), ref, atol=1e-5, rtol=0)
