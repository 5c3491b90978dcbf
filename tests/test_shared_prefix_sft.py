"""`SharedPrefixSFTTrainer`: a batch's shared prefix run once gives `SFTTrainer`'s loss and gradients to 1e-5, and
every batch it cannot share takes `SFTTrainer`'s own path."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig

from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory
from sleep_trl.sleep.consolidation import CHECKPOINTING
from sleep_trl.tiny import build_model
from sleep_trl.trainers.shared_prefix import shared_prefix_length
from sleep_trl.trainers.shared_prefix_sft import SharedPrefixSFTTrainer

ARCHS = ["llama", "qwen2"]


def memory_model(tokenizer, arch):
    """A tiny model whose fast expert (random weights, so it changes the output) is the only trainable part."""
    model = build_model(tokenizer, arch=arch, num_hidden_layers=3, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    mem = attach_memory(model, MemoryConfig(levels=[LevelConfig("fast", rank=8)]))
    mem.freeze_all_but(mem.expand("fast"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mem.parameters("fast"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, mem


def batch(prefix_len, tail_lengths, vocab, pad, seed=0):
    """Right-padded rows: a common random prefix, then random tails of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=gen)
    rows = [torch.cat([prefix, torch.randint(3, vocab, (n,), generator=gen)]) for n in tail_lengths]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def trainer(model, tokenizer, tmp_path, share, checkpointing=False):
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1,
                     **{CHECKPOINTING: checkpointing},
                     per_device_train_batch_size=4)
    data = Dataset.from_dict({"text": ["a b c", "d e f"]})
    t = SharedPrefixSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                               share_prefix=share)
    t.model.train()
    return t


def loss_and_grads(t, inputs, num_items=None):
    t.model.zero_grad()
    loss = t.compute_loss(t.model, dict(inputs), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def test_shared_prefix_length_stops_at_the_first_difference_in_ids_labels_or_padding():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    assert shared_prefix_length(ids, ids.clone(), mask) == 3
    labels = ids.clone()
    labels[1, 1] = -100  # the same token, trained in one row and not in another: not shared
    assert shared_prefix_length(ids, labels, mask) == 1
    mask[2, 2:] = 0  # row 2 ends after 2 tokens (padding)
    assert shared_prefix_length(ids, ids.clone(), mask) == 2
    same = torch.tensor([[4, 4], [4, 4]])
    assert shared_prefix_length(same, same.clone(), torch.ones_like(same)) == 2


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_items", [None, 37])
def test_the_shared_prefix_path_gives_sft_loss_and_gradients(tiny_tokenizer, tmp_path, arch, num_items):
    model, mem = memory_model(tiny_tokenizer, arch)
    inputs = batch(9, [4, 7, 1, 5], len(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    plain = trainer(model, tiny_tokenizer, tmp_path / "plain", share=False)
    shared = trainer(model, tiny_tokenizer, tmp_path / "shared", share=True)
    loss_r, grads_r = loss_and_grads(plain, inputs, num_items)
    loss_s, grads_s = loss_and_grads(shared, inputs, num_items)
    assert shared.shared_prefix_stats["shared_batches"] == 1 and plain.shared_prefix_stats["shared_batches"] == 0
    torch.testing.assert_close(loss_s, loss_r, atol=1e-5, rtol=1e-5)
    assert set(grads_s) == set(grads_r) == set(mem.names(mem.parameters("fast")))  # only the expert learns
    assert all(g.abs().sum() > 0 for g in grads_r.values())
    for name in grads_r:
        torch.testing.assert_close(grads_s[name], grads_r[name], atol=1e-5, rtol=1e-5)
    # The prefix (8 of its 9 tokens) ran once instead of 4 times: 3 x 8 tokens fewer than the padded batch.
    stats = shared.shared_prefix_stats
    assert stats["tokens_run"] == inputs["input_ids"].numel() - 3 * 8
    assert stats["tokens"] == int(inputs["attention_mask"].sum())
    metrics = shared._metrics["train"]
    assert 0.0 <= metrics["mean_token_accuracy"][-1] <= 1.0 and metrics["entropy"][-1] > 0


def test_a_completion_only_batch_shares_its_masked_prompt(tiny_tokenizer, tmp_path):
    """Labels masked on the shared part (a prompt the loss skips) are shared too: the loss is the plain one."""
    model, _ = memory_model(tiny_tokenizer, "qwen2")
    inputs = batch(6, [3, 5, 4], len(tiny_tokenizer), tiny_tokenizer.pad_token_id, seed=1)
    inputs["labels"][:, :6] = -100
    loss_r, grads_r = loss_and_grads(trainer(model, tiny_tokenizer, tmp_path / "p", share=False), inputs)
    loss_s, grads_s = loss_and_grads(trainer(model, tiny_tokenizer, tmp_path / "s", share=True), inputs)
    torch.testing.assert_close(loss_s, loss_r, atol=1e-5, rtol=1e-5)
    for name in grads_r:
        torch.testing.assert_close(grads_s[name], grads_r[name], atol=1e-5, rtol=1e-5)


def test_batches_without_a_long_enough_shared_prefix_take_sfts_own_path(tiny_tokenizer, tmp_path):
    model, _ = memory_model(tiny_tokenizer, "qwen2")
    t = trainer(model, tiny_tokenizer, tmp_path, share=True)
    short = batch(3, [4, 6], len(tiny_tokenizer), tiny_tokenizer.pad_token_id)  # 2 shareable tokens: too few
    loss_and_grads(t, short)
    single = batch(9, [4], len(tiny_tokenizer), tiny_tokenizer.pad_token_id)  # one row: nothing to share
    loss_and_grads(t, single)
    assert t.shared_prefix_stats["batches"] == 2 and t.shared_prefix_stats["shared_batches"] == 0


def test_activation_checkpointing_takes_sfts_own_path(tiny_tokenizer, tmp_path):
    model, _ = memory_model(tiny_tokenizer, "qwen2")
    t = trainer(model, tiny_tokenizer, tmp_path, share=True, checkpointing=True)
    loss_and_grads(t, batch(9, [4, 6], len(tiny_tokenizer), tiny_tokenizer.pad_token_id))
    assert t.shared_prefix_stats["batches"] == 1 and t.shared_prefix_stats["shared_batches"] == 0


def prompt_completion_rows(prefix_len, prompt_tails, completions, vocab, pad, seed=0):
    """`[left-padded prompt | right-padded completion]` rows whose prompts start with one random prefix."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=gen)
    prompts = [torch.cat([prefix, torch.randint(3, vocab, (n,), generator=gen)]) for n in prompt_tails]
    outs = [torch.randint(3, vocab, (n,), generator=gen) for n in completions]
    P, K = max(map(len, prompts)), max(map(len, outs))
    ids = torch.full((len(prompts), P + K), pad)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, outs, strict=True)):
        ids[i, P - len(p) : P], mask[i, P - len(p) : P] = p, 1
        ids[i, P : P + len(c)], mask[i, P : P + len(c)] = c, 1
    return ids, mask, K


@pytest.mark.parametrize("arch", ARCHS)
def test_last_hidden_shared_prefix_gives_the_plain_forwards_states_and_gradients(tiny_tokenizer, arch):
    """The student's hidden states before each completion token (what TRL's `_get_last_hidden_state` returns) with
    the prompts' shared prefix read once: same values and same gradients to 1e-5, at every real completion token."""
    from sleep_trl.generation.hf import cache_keyword
    from sleep_trl.trainers.shared_prefix import last_hidden_shared_prefix
    from sleep_trl.trainers.teachers import backbone_of

    model, mem = memory_model(tiny_tokenizer, arch)
    model.train()
    ids, mask, K = prompt_completion_rows(7, [3, 6, 1, 4], [2, 4, 3, 1], len(tiny_tokenizer), 0)
    backbone = backbone_of(model)
    gen = torch.Generator().manual_seed(3)
    weights = torch.randn(len(ids), K, model.config.hidden_size, generator=gen)
    real = mask[:, -K:].bool()

    def states_and_grads(shared):
        model.zero_grad()
        if shared:
            h = last_hidden_shared_prefix(backbone, ids, mask, K, cache_keyword(backbone))
        else:
            h = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -K:]
        (h * weights * real[..., None]).sum().backward()
        return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    h_plain, g_plain = states_and_grads(False)
    h_shared, g_shared = states_and_grads(True)
    torch.testing.assert_close(h_shared[real], h_plain[real], atol=1e-5, rtol=1e-5)
    assert set(g_shared) == set(g_plain) == set(mem.names(mem.parameters("fast")))
    # Relative to each gradient's norm (entries reach ~100 here): the rows sit at other absolute positions than in
    # the plain forward, and rotary embeddings round differently there (in float64 the states differ by 2e-7).
    for name in g_plain:
        assert (g_shared[name] - g_plain[name]).norm() <= 1e-5 * g_plain[name].norm(), name


def test_last_hidden_shared_prefix_declines_batches_it_cannot_share(tiny_tokenizer):
    from sleep_trl.trainers.shared_prefix import last_hidden_shared_prefix
    from sleep_trl.trainers.teachers import backbone_of

    model, _ = memory_model(tiny_tokenizer, "qwen2")
    backbone = backbone_of(model)
    short, mask, K = prompt_completion_rows(2, [3, 5], [2, 2], len(tiny_tokenizer), 0)
    assert last_hidden_shared_prefix(backbone, short, mask, K, "cache") is None  # 2 shared tokens: too few
    one, mask, K = prompt_completion_rows(8, [3], [2], len(tiny_tokenizer), 0)
    assert last_hidden_shared_prefix(backbone, one, mask, K, "cache") is None  # one row


@pytest.mark.parametrize("seen", [True, False], ids=["flag-read-off-the-model", "cache-guard-alone"])
def test_a_model_checkpointed_by_another_trainer_takes_sfts_own_path(tiny_tokenizer, tmp_path, monkeypatch, seen):
    """Checkpointing switched on on the model itself (as TRL's `SFTConfig` does by default for the user's trainer a
    `SleepCallback` consolidates), not in this trainer's arguments: its layers would drop the prefix's cache.
    `sharing_applies` sees the layers' flag; where it cannot (`seen=False`: a model that drops its cache some other
    way), the prefix forward's empty cache sends the batch down SFT's own path all the same."""
    if not seen:
        monkeypatch.setattr("sleep_trl.trainers.shared_prefix_sft.sharing_applies", lambda trainer: True)
    model, _ = memory_model(tiny_tokenizer, "qwen2")
    t = trainer(model, tiny_tokenizer, tmp_path, share=True)
    t.model.gradient_checkpointing_enable()
    t.model.train()
    inputs = batch(9, [4, 6], len(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    loss, grads = loss_and_grads(t, inputs)
    assert t.shared_prefix_stats["shared_batches"] == 0
    t.model.gradient_checkpointing_disable()
    plain = trainer(model, tiny_tokenizer, tmp_path, share=False)
    plain_loss, plain_grads = loss_and_grads(plain, inputs)
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert set(grads) == set(plain_grads)
    for name in plain_grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-5)


def test_last_hidden_shared_prefix_declines_a_model_that_fills_no_cache(tiny_tokenizer):
    """A checkpointing model in training runs its layers with the cache off: the prefix would be read into nothing
    and every row's remaining tokens would attend to no prefix (hidden states off by ~2 on the callback's model)."""
    from sleep_trl.generation.hf import cache_keyword
    from sleep_trl.trainers.shared_prefix import last_hidden_shared_prefix
    from sleep_trl.trainers.teachers import backbone_of

    model, _ = memory_model(tiny_tokenizer, "qwen2")
    model.gradient_checkpointing_enable()
    model.train()
    ids, mask, K = prompt_completion_rows(7, [3, 6, 1, 4], [2, 4, 3, 1], len(tiny_tokenizer), 0)
    backbone = backbone_of(model)
    assert last_hidden_shared_prefix(backbone, ids, mask, K, cache_keyword(backbone)) is None
    with torch.no_grad():  # no backward to replay: the layers keep their cache, and sharing is exact again
        assert last_hidden_shared_prefix(backbone, ids, mask, K, cache_keyword(backbone)) is not None
