"""SleepCallback inside a user's SFTTrainer: sleeps every N steps, prunes the fast level, resumes from checkpoints."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory, find_memory
from sleep_trl.sleep import SleepCallback

TEXTS = [f"The lighthouse number {i} stands on the island of Orvel and is painted amber." for i in range(16)]
PROMPTS = [f"Tell me about lighthouse number {i}." for i in range(8)]


def model_with_memory(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    levels = [LevelConfig("fast", num_slots=1, rank=4, chunk_size=3, gate="fixed"),
              LevelConfig("slow", num_slots=3, rank=4, gate="fixed")]
    mem = attach_memory(model, MemoryConfig(levels=levels))
    mem.freeze_all_but(mem.expand("fast"))
    return model, mem


def sft_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                use_cpu=True, bf16=False, report_to="none", save_strategy="no", gradient_checkpointing=False,
                logging_steps=1, disable_tqdm=True, max_length=64, seed=0)
    base.update(kw)
    return SFTConfig(**base)


# One step, so no warmup (the shared consolidation defaults warm up over 2 steps, which would leave it at lr 0).
CONSOLIDATION = dict(max_steps=1, per_device_train_batch_size=4, max_completion_length=6, learning_rate=1e-3,
                     warmup_steps=0)


def test_sleeps_at_every_boundary_and_prunes_the_fast_level(tmp_path, tiny_dir, tiny_tokenizer):
    model, mem = model_with_memory(tiny_dir("cb_llama", arch="llama", seed=4))
    callback = SleepCallback(prompts=PROMPTS, consolidation_args=CONSOLIDATION)  # every chunk_size = 3 steps
    seen = []

    original = callback.sleep  # wrapped to record what the fast level holds right before each sleep

    def spying_sleep(*args, **kwargs):
        seen.append({n: p.detach().clone() for n, p in zip(
            mem.names(mem.parameters("fast")), mem.parameters("fast"))})
        return original(*args, **kwargs)

    callback.sleep = spying_sleep
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer, callbacks=[callback])
    trainer.train()
    assert callback.num_sleeps == 2 and [h["step"] for h in callback.history] == [3, 6]
    assert mem.unlocked("slow") == 2 and mem.unlocked("fast") == 1
    # each sleep started from a fast level that had learned (non-zero B) and left a pruned one (B zero)
    assert all(any(torch.count_nonzero(t) for n, t in snap.items() if ".down_" in n) for snap in seen)
    assert all(torch.count_nonzero(p) == 0 for n, p in zip(mem.names(mem.parameters("fast")),
                                                            mem.parameters("fast")) if ".down_" in n)
    # the wake trains exactly the fast slot again; the consolidated slow experts are frozen and hold knowledge
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(mem.names(mem.parameters("fast")))
    slow = dict(zip(mem.names(mem.parameters("slow", slots=[0, 1])), mem.parameters("slow", slots=[0, 1])))
    assert all(torch.count_nonzero(p) for n, p in slow.items() if ".down_" in n)


def test_state_and_memory_are_saved_with_checkpoints_and_restored(tmp_path, tiny_dir, tiny_tokenizer):
    path = tiny_dir("cb_llama2", arch="llama", seed=5)
    data = Dataset.from_dict({"text": TEXTS})
    model, mem = model_with_memory(path)
    args = sft_args(tmp_path, save_strategy="steps", save_steps=3, max_steps=3)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer,
                         callbacks=[SleepCallback(prompts=PROMPTS, consolidation_args=CONSOLIDATION)])
    trainer.train()
    checkpoint = tmp_path / "sft" / "checkpoint-3"
    stored = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["SleepCallback"]
    assert stored["attributes"]["num_sleeps"] == 1
    assert json.loads((checkpoint / "memory_config.json").read_text())["state"]["unlocked"]["slow"] == 1
    slow_after_first = {n: p.detach().clone() for n, p in zip(mem.names(mem.parameters("slow", slots=[0])),
                                                               mem.parameters("slow", slots=[0]))}

    # a fresh process: same model, fresh memory, resume to 6 steps
    model2, mem2 = model_with_memory(path)
    callback2 = SleepCallback(prompts=PROMPTS, consolidation_args=CONSOLIDATION)
    trainer2 = SFTTrainer(model=model2, args=sft_args(tmp_path, save_strategy="steps", save_steps=3, max_steps=6),
                          train_dataset=data, processing_class=tiny_tokenizer, callbacks=[callback2])
    trainer2.train(resume_from_checkpoint=str(checkpoint))
    assert callback2.num_sleeps == 2 and [h["step"] for h in callback2.history] == [3, 6]
    assert find_memory(model2).unlocked("slow") == 2
    for name, before in slow_after_first.items():  # the expert consolidated before the restart came back intact
        assert torch.equal(dict(model2.named_parameters())[name], before)


def test_without_memory_is_a_clear_error(tmp_path, tiny_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("cb_plain", arch="llama", seed=6))
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path, max_steps=1),
                         train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tiny_tokenizer,
                         callbacks=[SleepCallback(every_n_steps=1, prompts=PROMPTS)])
    with pytest.raises(ValueError, match="continuum memory"):
        trainer.train()


def test_callback_and_cycle_sleep_with_the_same_defaults(monkeypatch, tmp_path, tiny_dir, tiny_tokenizer):
    """One sleep step: the callback calls the cycle's `consolidate` with the cycle's consolidation defaults."""
    import sleep_trl.sleep.callback as callback_module
    from sleep_trl.sleep import CONSOLIDATION_DEFAULTS, SleepConfig
    from sleep_trl.sleep.consolidation import ConsolidationResult

    calls = []

    def fake_consolidate(model, tokenizer, prompts, args, **kwargs):
        calls.append(dict(args))
        return ConsolidationResult(slot=0, steps=args["max_steps"], train_loss=0.0, prompts=len(prompts))

    monkeypatch.setattr(callback_module, "consolidate", fake_consolidate)
    model, mem = model_with_memory(tiny_dir("cb_llama3", arch="llama", seed=7))
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path, max_steps=3), processing_class=tiny_tokenizer,
                         train_dataset=Dataset.from_dict({"text": TEXTS}), callbacks=[SleepCallback(prompts=PROMPTS)])
    trainer.train()
    [fields] = calls
    cycle_fields = SleepConfig().phase_fields("consolidation_args")
    for key, value in CONSOLIDATION_DEFAULTS.items():
        if key not in ("report_to", "save_strategy"):  # the callback keeps its sleeps quiet and checkpoint-free
            assert fields[key] == value == cycle_fields[key], key
