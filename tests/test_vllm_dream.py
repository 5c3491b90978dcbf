"""DreamTrainer with `use_vllm=True` on vLLM's CPU backend: the dreams come from sleep-trl's colocate engine (the
same weight-sync path as GeneralizedDistillationTrainer), and after training and a sync the engine's log-probs
equal the trained policy's (plain model, and a model carrying a continuum memory served as its dense fold).

Runs in the vLLM virtualenv: `bash scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest -m vllm tests/`.
"""

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

try:
    import vllm  # noqa: F401
except Exception as exc:  # noqa: BLE001
    pytest.skip(f"vLLM is not importable ({type(exc).__name__}: {exc}); run `bash scripts/setup_vllm.sh` and "
                "`.venv-vllm/bin/python -m pytest -m vllm tests/`", allow_module_level=True)

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from sleep_trl.dreaming.passages import demo_tasks
from sleep_trl.generation.vllm_cpu import SleepVLLMGeneration
from sleep_trl.trainers import DreamConfig, DreamTrainer


def answer_log_likelihood(model, tokenizer, task) -> float:
    """A continuous tau: mean log-likelihood per token of the reference answers."""
    total, count = 0.0, 0
    for question, answer in zip(task["questions"], task["answers"], strict=True):
        prompt, target = tokenizer(f"Q: {question}\nA:")["input_ids"], tokenizer(f" {answer}")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1].float()
        total += torch.log_softmax(logits, -1).gather(-1, torch.tensor(target)[:, None]).sum().item()
        count += len(target)
    return total / count


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, num_dreams=2, per_device_train_batch_size=2,
        max_steps=2, max_completion_length=8, learning_rate=5e-2, logging_steps=1, report_to="none",
        save_strategy="no", gradient_checkpointing=False, num_selected_dreams=1, num_random_dreams=0,
        importance_score="alignment", reward_type="improvement", inner_steps=1, inner_lora_r=2, inner_lora_alpha=4,
        num_dreams_to_print=0, seed=0, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=256,
    )
    base.update(kw)
    return DreamConfig(**base)


def policy_logprobs(model, sequences):
    model.eval()
    out = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0])
    return out


def count_engine_calls(trainer):
    calls = []
    generate = trainer.vllm_generation.generate

    def counted(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    trainer.vllm_generation.generate = counted
    return calls


def check_engine_matches_policy(trainer, tokenizer):
    sequences = [tokenizer(f"The quiet harbour number {i} keeps its lamps lit.")["input_ids"] for i in range(3)]
    trainer.vllm_generation.sync_weights()
    engine = trainer.vllm_generation.prompt_logprobs(sequences)
    policy = policy_logprobs(trainer.model, sequences)
    for e, p in zip(engine, policy, strict=True):
        assert torch.allclose(e, p, atol=1e-4), (e - p).abs().max()


def test_dreams_come_from_the_engine_and_it_serves_the_trained_policy(tmp_path, student_dir, tiny_tokenizer):
    initial = AutoModelForCausalLM.from_pretrained(student_dir)
    trainer = DreamTrainer(str(student_dir), args=config(tmp_path), train_dataset=Dataset.from_list(demo_tasks(2)),
                           processing_class=tiny_tokenizer, tau=answer_log_likelihood)
    assert trainer.use_vllm and isinstance(trainer.vllm_generation, SleepVLLMGeneration)
    calls = count_engine_calls(trainer)
    trainer.train()
    assert len(calls) == 2  # one generation batch per step, from vLLM
    changed = max((p - q).abs().max().item() for p, q in zip(trainer.model.parameters(), initial.parameters()))
    assert changed > 1e-4
    check_engine_matches_policy(trainer, tiny_tokenizer)


def test_a_memory_model_dreams_through_its_dense_fold(tmp_path, tiny_dir, tiny_tokenizer):
    from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama_dream_mem", arch="llama", seed=6))
    levels = [LevelConfig("slow", num_slots=2, rank=4, gate="fixed")]
    mem = attach_memory(model, MemoryConfig(levels=levels))
    names = mem.expand("slow")
    mem.freeze_all_but(names)
    trainer = DreamTrainer(model, args=config(tmp_path), train_dataset=Dataset.from_list(demo_tasks(2)),
                           processing_class=tiny_tokenizer, tau=answer_log_likelihood)
    calls = count_engine_calls(trainer)
    trainer.train()
    assert len(calls) == 2
    assert any(torch.count_nonzero(p) for p in mem.parameters("slow", slots=[0]))  # the expert learned
    check_engine_matches_policy(trainer, tiny_tokenizer)
