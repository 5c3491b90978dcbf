"""`FrozenTrunk` (sleep_trl.memory.trunk): the layers below the memory served from a per-text cache. Every test
compares against the plain full forward of the same model: loss, logits and gradients to 1e-5, and counts how often
the bottom layers really ran."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from sleep_trl.memory import FrozenTrunk, LevelConfig, MemoryConfig, attach_memory
from sleep_trl.tiny import build_model

ARCHS = ["llama", "qwen2"]


def memory_model(tokenizer, arch="qwen2", layers=(2, 3), seed=0):
    """A 4-layer tiny model with a fast expert in `layers` that changes the output (random weights), only it trains."""
    model = build_model(tokenizer, arch=arch, num_hidden_layers=4, seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    mem = attach_memory(model, MemoryConfig(layers=list(layers), levels=[LevelConfig("fast", rank=8)]))
    names = mem.expand("fast")
    mem.freeze_all_but(names)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mem.parameters("fast"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, mem


def right_padded(lengths, vocab, pad=0, seed=0, left=False):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[i, cols] = torch.randint(1, vocab, (n,), generator=gen)
        mask[i, cols] = 1
    return ids, mask


def loss_and_grads(model, ids, mask, **forward_kwargs):
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **forward_kwargs)
    out.loss.backward()
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def assert_same(reference, got, mask):
    (loss_r, logits_r, grads_r), (loss_g, logits_g, grads_g) = reference, got
    torch.testing.assert_close(loss_g, loss_r, atol=1e-5, rtol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(logits_g[real], logits_r[real], atol=1e-5, rtol=1e-5)
    assert grads_g.keys() == grads_r.keys()
    for key in grads_r:
        torch.testing.assert_close(grads_g[key], grads_r[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_rows_give_the_full_forwards_loss_logits_and_gradients(tiny_tokenizer, arch):
    model, mem = memory_model(tiny_tokenizer, arch)
    model.train()
    ids, mask = right_padded([9, 5, 7], len(tiny_tokenizer))
    reference = loss_and_grads(model, ids, mask)
    with mem.frozen_trunk() as trunk:
        first = loss_and_grads(model, ids, mask)
        assert trunk.layer_runs == 1 and len(trunk.cache) == 3  # one capture pass for the three new texts
        second = loss_and_grads(model, ids, mask)
        assert trunk.layer_runs == 1 and trunk.served_rows == 3  # the second epoch never ran layers 0-1
    assert_same(reference, first, mask)
    assert_same(reference, second, mask)
    assert {id(p) for p in mem.parameters("fast")} == set(reference[2])  # only the expert learns


def test_a_batch_of_seen_and_new_texts_captures_only_the_new_ones(tiny_tokenizer):
    model, mem = memory_model(tiny_tokenizer)
    vocab = len(tiny_tokenizer)
    ids, mask = right_padded([6, 4], vocab)
    more_ids, more_mask = right_padded([8, 3], vocab, seed=1)
    # one batch: the first seen text (padded wider than before) and two new ones
    width = 8
    mixed_ids = torch.zeros((3, width), dtype=torch.long)
    mixed_mask = torch.zeros((3, width), dtype=torch.long)
    mixed_ids[0, :6], mixed_mask[0, :6] = ids[0, :6], 1
    mixed_ids[1:, :], mixed_mask[1:, :] = more_ids, more_mask
    reference = loss_and_grads(model, mixed_ids, mixed_mask)
    with mem.frozen_trunk() as trunk:
        loss_and_grads(model, ids, mask)
        seen = set(trunk.cache)
        got = loss_and_grads(model, mixed_ids, mixed_mask)
        assert trunk.layer_runs == 2 and len(trunk.cache) == 4 and seen < set(trunk.cache)
    assert_same(reference, got, mixed_mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_rows_are_served_from_states_computed_unpadded(tiny_tokenizer, arch):
    """Rotary positions are relative: a row's states do not depend on where its run starts, so a left-padded batch
    (a prompt batch) is served from the same cache entries as a right-padded one."""
    model, mem = memory_model(tiny_tokenizer, arch)
    right_ids, right_mask = right_padded([9, 5], len(tiny_tokenizer))
    left_ids, left_mask = right_padded([9, 5], len(tiny_tokenizer), left=True)
    reference = loss_and_grads(model, left_ids, left_mask)
    with mem.frozen_trunk() as trunk:
        loss_and_grads(model, right_ids, right_mask)
        got = loss_and_grads(model, left_ids, left_mask)
        assert trunk.layer_runs == 1 and trunk.served_rows == 2
    assert_same(reference, got, left_mask)


@pytest.mark.parametrize("case", ["holed_mask", "bottom_trains", "no_budget", "shifted_positions"])
def test_layouts_it_cannot_serve_run_in_full_and_stay_exact(tiny_tokenizer, case):
    model, mem = memory_model(tiny_tokenizer)
    ids, mask = right_padded([7, 4], len(tiny_tokenizer))
    if case == "holed_mask":  # two runs of tokens in one row: not one text
        mask[0, 3] = 0
    if case == "bottom_trains":
        model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    kwargs = {"max_megabytes": 0} if case == "no_budget" else {}
    forward_kwargs = {"position_ids": torch.arange(7).expand(2, 7) + 1} if case == "shifted_positions" else {}

    reference = loss_and_grads(model, ids, mask, **forward_kwargs)
    with mem.frozen_trunk(**kwargs) as trunk:
        got = [loss_and_grads(model, ids, mask, **forward_kwargs) for _ in range(2)]
        assert trunk.layer_runs == 2 and not trunk.cache  # every forward ran the bottom layers
    for g in got:
        assert_same(reference, g, mask)
    if case == "bottom_trains":
        assert id(model.model.layers[0].mlp.up_proj.weight) in reference[2]


@pytest.mark.parametrize("arch", ARCHS)
def test_sequences_the_model_generated_while_recording_are_served_without_running_the_trunk(tiny_tokenizer, arch):
    """A distillation step's rows are prompts plus the teacher's fresh samples: recorded while they were generated
    (the prefill and each decoding step), they need no bottom-layer pass. The last sampled token is never fed, so
    its input is zero with `last_position_unused`: every other position's output, the loss on them and its
    gradients are the full forward's."""
    model, mem = memory_model(tiny_tokenizer, arch)
    prompts, prompt_mask = right_padded([6, 3, 5], len(tiny_tokenizer), left=True)
    torch.manual_seed(0)
    with mem.frozen_trunk(last_position_unused=True) as trunk:
        with trunk.recording():
            out = model.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=5, do_sample=True,
                                 eos_token_id=None, pad_token_id=0)
        runs = trunk.layer_runs
        assert runs == 5  # the prefill and four decoding steps
        completions = out[:, prompts.shape[1]:]
        ids = torch.cat([prompts, completions], 1)
        mask = torch.cat([prompt_mask, torch.ones_like(completions)], 1)

        def distill_like():  # loss on the completion, read at the positions before each completion token
            model.zero_grad()
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            logits = model.lm_head(hidden[:, -completions.shape[1]:])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), completions.flatten())
            loss.backward()
            grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
            return loss.detach(), hidden.detach(), grads

        got = distill_like()
        assert trunk.layer_runs == runs and trunk.served_rows == 3  # no bottom-layer pass at all
    reference = distill_like()
    assert_same(reference, got, mask[:, :-1])


def test_exit_restores_the_layers_and_a_memory_at_layer_0_is_a_no_op(tiny_tokenizer):
    model, mem = memory_model(tiny_tokenizer)
    ids, mask = right_padded([5, 5], len(tiny_tokenizer))
    with mem.frozen_trunk() as trunk:
        assert all("forward" in layer.__dict__ for layer in model.model.layers[:2])
        model(input_ids=ids, attention_mask=mask)
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)
    assert not trunk.cache and not model.model._forward_pre_hooks and not model.model._forward_hooks
    model(input_ids=ids, attention_mask=mask)
    assert trunk.layer_runs == 1  # the trunk no longer counts (or serves) anything

    # an instance-level forward already on a layer (accelerate's hooks put one there) is put back, not dropped
    layer0 = model.model.layers[0]
    own = layer0.forward
    layer0.forward = own
    with mem.frozen_trunk() as outer:
        with mem.frozen_trunk() as inner:  # a second trunk on the same model stays out of the way
            assert inner.disabled and FrozenTrunk.active_for(model) is outer
        assert FrozenTrunk.active_for(model) is outer
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
        assert outer.served_rows == 2
    assert layer0.__dict__["forward"] is own and FrozenTrunk.active_for(model) is None

    full, full_mem = memory_model(tiny_tokenizer, layers=(0, 1, 2, 3))
    with full_mem.frozen_trunk() as trunk:
        assert trunk.disabled
        full(input_ids=ids, attention_mask=mask)
    assert trunk.layer_runs == 0 and not full.model._forward_pre_hooks


def test_generation_inside_the_trunk_runs_in_full(tiny_tokenizer):
    model, mem = memory_model(tiny_tokenizer)
    ids, mask = right_padded([5], len(tiny_tokenizer))
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with mem.frozen_trunk() as trunk:
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert not trunk.cache and trunk.layer_runs == 4  # prefill and three decoding steps, all in full
    assert torch.equal(got, expected)


def test_sft_trainer_learns_the_same_expert_with_and_without_the_trunk(tiny_tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    texts = ["the river " * k + "runs to the sea" for k in range(1, 7)]
    results = {}
    for use_trunk in (False, True):
        model, mem = memory_model(tiny_tokenizer)
        args = SFTConfig(output_dir=str(tmp_path / str(use_trunk)), max_steps=6, per_device_train_batch_size=3,
                         learning_rate=1e-2, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                         logging_steps=1, seed=0, dataset_text_field="text", disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tiny_tokenizer)
        if use_trunk:
            with mem.frozen_trunk() as trunk:
                trainer.train()
            assert trunk.served_rows == 12 and trunk.layer_runs == 2  # 6 texts: captured in the first 2 steps
        else:
            trainer.train()
        results[use_trunk] = [p.detach().clone() for p in mem.parameters("fast")]
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_a_backbone_that_changes_its_inputs_embeds_is_served_exactly(tiny_tokenizer):
    """GPT-2 adds its position embeddings to `inputs_embeds` inside the backbone: the served states must reach layer
    L unchanged (the first skipped layer hands them on itself). Absolute positions: a left-padded row would see other
    position embeddings, so it runs in full."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=4, n_head=2,
                                       n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    for p in model.parameters():
        p.requires_grad_(False)
    mem = attach_memory(model, MemoryConfig(layers=[2, 3], levels=[LevelConfig("fast", rank=8)]))
    mem.freeze_all_but(mem.expand("fast"))
    with torch.no_grad():
        for p in mem.parameters("fast"):
            p.normal_(0, 0.1)
    ids, mask = right_padded([8, 5], len(tiny_tokenizer))
    left_ids, left_mask = right_padded([8, 5], len(tiny_tokenizer), left=True)
    reference = loss_and_grads(model, ids, mask)
    left_reference = loss_and_grads(model, left_ids, left_mask)
    with mem.frozen_trunk() as trunk:
        loss_and_grads(model, ids, mask)
        got = loss_and_grads(model, ids, mask)
        assert trunk.served_rows == 2 and trunk.layer_runs == 1
        left = loss_and_grads(model, left_ids, left_mask)
        assert trunk.served_rows == 2 and trunk.layer_runs == 2
    assert_same(reference, got, mask)
    assert_same(left_reference, left, left_mask)
