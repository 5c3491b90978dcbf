"""GeneralizedDistillationTrainer with `use_vllm=True` on vLLM's CPU backend: teacher sampling and student rollouts
come from the engine, with the right weights (a separate teacher checkpoint, a PEFT teacher view, a continuum-memory
teacher view), and training runs.

Runs in the vLLM virtualenv: `bash scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest -m vllm tests/`.
"""

import random

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

from sleep_trl.trainers import GeneralizedDistillationConfig, GeneralizedDistillationTrainer


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=4, max_steps=2,
        max_completion_length=8, logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=False,
        learning_rate=1e-3, seed=0, gamma=0.0, num_imitation_generations=2, use_vllm=True, vllm_mode="colocate",
        vllm_max_model_length=128, top_k=1,  # top_k=1: greedy in vLLM and transformers alike, comparable exactly
    )
    base.update(kw)
    return GeneralizedDistillationConfig(**base)


def prompts(n=8):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Tell me about lake {i}."}] for i in range(n)]})


def greedy(model, prompt_ids, max_new_tokens, eos):
    out = []
    model.eval()
    with torch.no_grad():
        for ids in prompt_ids:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
            out.append(gen[: gen.index(eos) + 1] if eos in gen else gen)
    return out


def teacher_samples(trainer, ids, replay=None):
    return trainer.teachers.sample(ids, replay or [False] * len(ids), random.Random(0))


def batch_prompt_ids(trainer, n=4):
    return trainer._tokenize_prompts([prompts()[i]["prompt"] for i in range(n)])[0]


def test_separate_teacher_is_sampled_by_its_own_engine(tmp_path, student_dir, teacher_dir, tiny_tokenizer):
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(),
        args=config(tmp_path, lmbda=0.0, alpha=0.5),
    )
    assert trainer.use_vllm and trainer.vllm_generation is not None
    ids = batch_prompt_ids(trainer)
    samples = teacher_samples(trainer, ids)
    assert 0 in trainer.teachers._engines  # sampled by the teacher's own engine, not by transformers
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert samples == greedy(teacher, ids, 8, tiny_tokenizer.eos_token_id)
    trainer.train()
    assert any("imitation/reward" in h for h in trainer.state.log_history)


def test_peft_teacher_view_is_swapped_into_the_student_engine(tmp_path, student_dir, tiny_tokenizer):
    from peft import LoraConfig

    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), train_dataset=prompts(),
        peft_config=LoraConfig(r=4, target_modules=["down_proj", "o_proj"], init_lora_weights=False),
        args=config(tmp_path, teacher_view="disable_adapter", lmbda=0.0, alpha=0.5, max_steps=1),
    )
    ids = batch_prompt_ids(trainer)
    eos = tiny_tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(student_dir)
    assert teacher_samples(trainer, ids) == greedy(base, ids, 8, eos)
    # the student's own rollouts come back from the same engine with the adapter merged
    trainer.vllm_generation.sync_weights()
    student = trainer.vllm_generation.generate_token_ids(ids, **trainer.teachers.vllm_sampling())
    with torch.no_grad():
        assert student == greedy(trainer.model, ids, 8, eos)
    assert student != teacher_samples(trainer, ids)
    trainer.train()


def test_memory_teacher_view_and_student_through_the_dense_engine(tmp_path, tiny_dir, tiny_tokenizer):
    from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory

    path = tiny_dir("llama_mem", arch="llama", seed=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    levels = [LevelConfig("fast", num_slots=1, rank=4, gate="fixed"), LevelConfig("slow", num_slots=2, rank=4, gate="fixed")]
    mem = attach_memory(model, MemoryConfig(levels=levels))
    mem.expand("fast")
    with torch.no_grad():  # the awake model's fast memory holds something
        for p in mem.parameters("fast", slots=[0]):
            p.normal_(0, 0.5)
    names = mem.expand("slow")
    mem.suspend("fast")
    trainer = GeneralizedDistillationTrainer(
        model=model, processing_class=tiny_tokenizer,
        train_dataset=prompts().add_column("replay", [i % 2 == 1 for i in range(len(prompts()))]),
        args=config(tmp_path, teacher_view="memory", lmbda=1.0, alpha=1.0, trainable_parameters=names, max_steps=1),
    )
    ids = batch_prompt_ids(trainer)
    eos = tiny_tokenizer.eos_token_id
    with mem.teacher_view():
        awake = greedy(model, ids, 8, eos)
    asleep = greedy(model, ids, 8, eos)
    assert awake != asleep
    assert teacher_samples(trainer, ids) == awake
    # replayed rows are written by the long-term memory before this sleep (fast level silent), swapped in the same way
    with mem.teacher_view(suspend=["fast"]):
        long_term = greedy(model, ids, 8, eos)
    assert long_term != awake
    replay = [False] + [True] * (len(ids) - 1)
    assert teacher_samples(trainer, ids, replay) == [awake[0]] + long_term[1:]
    trainer.vllm_generation.sync_weights()
    assert trainer.vllm_generation.generate_token_ids(ids, **trainer.teachers.vllm_sampling()) == asleep
    trainer.train()
