"""GeneralizedDistillationTrainer: the Knowledge Seeding objective against TRL and hand-written references."""

import math
import random

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from sleep_trl.trainers import teachers as teachers_module
from sleep_trl.trainers.generalized_distillation_config import GeneralizedDistillationConfig
from sleep_trl.trainers.generalized_distillation_objective import (
    clipped_policy_loss,
    generalized_jsd,
    group_advantages,
    router_gate_loss,
)
from sleep_trl.trainers.generalized_distillation_trainer import GeneralizedDistillationTrainer


def cpu_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=4, max_steps=2,
        max_completion_length=8, logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=False,
        learning_rate=1e-3, seed=0, num_imitation_generations=2, gamma=0.0,
    )
    base.update(kw)
    return GeneralizedDistillationConfig(**base)


def prompts(n=8, conversational=True):
    texts = [f"Tell me about the river number {i}." for i in range(n)]
    if conversational:
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
    return Dataset.from_dict({"prompt": texts})


def reference_divergence(student_logits, teacher_logits, mask, beta, temperature=1.0):
    """Generalized JSD written from its definition in probability space, averaged over valid tokens."""
    ps = torch.softmax(student_logits.double() / temperature, -1)
    pt = torch.softmax(teacher_logits.double() / temperature, -1)
    if beta == 0.0:
        d = (pt * (pt.log() - ps.log())).sum(-1)
    elif beta == 1.0:
        d = (ps * (ps.log() - pt.log())).sum(-1)
    else:
        m = beta * pt + (1 - beta) * ps
        d = beta * (pt * (pt.log() - m.log())).sum(-1) + (1 - beta) * (ps * (ps.log() - m.log())).sum(-1)
    return (d * mask).sum() / mask.sum()


def handmade_batch(tokenizer, seed=0, batch=3, prompt_len=5, completion_len=6):
    g = torch.Generator().manual_seed(seed)
    V = len(tokenizer)
    prompt_ids = torch.randint(10, V, (batch, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = tokenizer.pad_token_id
    completion_ids = torch.randint(10, V, (batch, completion_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0  # right padding
    completion_ids[1, 4:] = tokenizer.pad_token_id
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "num_items_in_batch": completion_mask.sum(),
    }


def completion_logits(model, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    K = batch["completion_ids"].size(1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, -K - 1 : -1]


# ---------------------------------------------------------------------------------------------------------------------
# Pure pieces of the objective
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_dense_generalized_jsd_matches_definition(beta):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    ours = generalized_jsd(zs, torch.log_softmax(zt / 2.0, -1), beta, temperature=2.0)
    ref = reference_divergence(zs[None], zt[None], torch.ones(1, 5), beta, temperature=2.0)
    assert torch.allclose(ours.double().mean(), ref, atol=1e-6)


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv = group_advantages(rewards, scale=True, eps=0.0 + 1e-4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))
    assert torch.allclose(group_advantages(rewards, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_clipped_policy_loss_hand_values():
    # ratio e^{0.5} = 1.6487 is clipped to 1.2 for a positive advantage; e^{-0.5} = 0.6065 to 0.8 for a negative one
    # only when that is the pessimistic (larger-loss) choice.
    logps = torch.tensor([[0.5, 0.0], [-0.5, 0.0]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = clipped_policy_loss(logps, old, adv, mask, epsilon=0.2, normalizer=3.0)
    # token (0,0): -min(1.6487*2, 1.2*2) = -2.4; (0,1): -min(2, 2) = -2; (1,0): -min(0.6065*-1, 0.8*-1) = 0.8
    expected = (-2.4 - 2.0 + 0.8) / 3.0
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_clipped_policy_loss_gradient_is_reinforce_at_ratio_one():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([0.7])
    clipped_policy_loss(logps, logps.detach(), adv, torch.ones(1, 2), 0.2, 2.0).backward()
    assert torch.allclose(logps.grad, torch.tensor([[-0.35, -0.35]]))


# ---------------------------------------------------------------------------------------------------------------------
# The distillation term against TRL and against the definition
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_alpha_one_reproduces_trl_distillation_loss(tmp_path, student_dir, teacher_dir, tiny_tokenizer, beta):
    from trl import DistillationConfig, DistillationTrainer

    # TRL's DistillationTrainer insists on equal vocab sizes, which our tiny student/teacher have.
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    batch = handmade_batch(tiny_tokenizer)
    common = dict(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none", beta=beta,
                  temperature=1.3, gradient_checkpointing=False)
    trl_trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=DistillationConfig(**common), train_dataset=prompts(),
        processing_class=tiny_tokenizer,
    )
    ours = GeneralizedDistillationTrainer(
        model=student, teacher_model=teacher, processing_class=tiny_tokenizer, train_dataset=prompts(),
        args=GeneralizedDistillationConfig(**{**common, "output_dir": str(tmp_path / "ours")}, alpha=1.0, lmbda=1.0),
    )
    student.train()
    trl_loss = trl_trainer.compute_loss(trl_trainer.model, dict(batch))
    our_loss = ours.compute_loss(ours.model, dict(batch))
    assert our_loss.item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-7)
    ref = reference_divergence(
        completion_logits(student, batch), completion_logits(teacher, batch), batch["completion_mask"], beta, 1.3
    )
    assert our_loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)


def test_padded_teacher_vocab_uses_tokenizer_length(tmp_path, student_dir, teacher_dir, tiny_tokenizer):
    """A teacher whose embedding table is padded (more rows than the tokenizer) gives the same loss as unpadded."""
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    padded = AutoModelForCausalLM.from_pretrained(teacher_dir)
    V = len(tiny_tokenizer)
    padded.resize_token_embeddings(V + 64, mean_resizing=False)
    with torch.no_grad():
        padded.get_output_embeddings().weight[V:] = 5.0  # garbage in the padding rows must not matter
    batch = handmade_batch(tiny_tokenizer, seed=3)
    losses = []
    for i, t in enumerate([teacher, padded]):
        trainer = GeneralizedDistillationTrainer(
            model=student, teacher_model=t, processing_class=tiny_tokenizer, train_dataset=prompts(),
            args=cpu_args(tmp_path / str(i), alpha=1.0, beta=0.5),
        )
        losses.append(trainer.compute_loss(trainer.model, dict(batch)).item())
    assert trainer._needs_vocab_slice
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    # Sampling never produces ids beyond the tokenizer: they are suppressed.
    assert set(range(V, V + 64)) <= set(trainer.generation_config.suppress_tokens)


def test_different_tokenizer_is_a_clear_error(tmp_path, student_dir):
    from sleep_trl.tiny import build_tokenizer, save_tiny

    other = save_tiny(tmp_path / "other", tokenizer=build_tokenizer(extra_texts=["zebra quokka axolotl " * 5]))
    with pytest.raises(ValueError, match="different tokenizer"):
        GeneralizedDistillationTrainer(
            model=str(student_dir), teacher_model=str(other), train_dataset=prompts(), args=cpu_args(tmp_path)
        )


@pytest.mark.parametrize("combination", ["logit_mean", "prob_mean"])
def test_several_teachers_match_their_definition(tmp_path, tiny_dir, student_dir, teacher_dir, tiny_tokenizer,
                                                 combination):
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    t1 = AutoModelForCausalLM.from_pretrained(teacher_dir)
    t2 = AutoModelForCausalLM.from_pretrained(tiny_dir("teacher_llama", arch="llama", seed=5))
    trainer = GeneralizedDistillationTrainer(
        model=student, teacher_model=[t1, t2], processing_class=tiny_tokenizer, train_dataset=prompts(),
        args=cpu_args(tmp_path, alpha=1.0, beta=0.0, teacher_weights=[3.0, 1.0], teacher_combination=combination),
    )
    batch = handmade_batch(tiny_tokenizer, seed=4)
    student.train()
    loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    z1, z2 = completion_logits(t1, batch).double(), completion_logits(t2, batch).double()
    if combination == "logit_mean":
        pt = torch.softmax(0.75 * z1 + 0.25 * z2, -1)
    else:
        pt = 0.75 * torch.softmax(z1, -1) + 0.25 * torch.softmax(z2, -1)
    ps = torch.softmax(completion_logits(student, batch).double(), -1)
    mask = batch["completion_mask"]
    ref = ((pt * (pt.log() - ps.log())).sum(-1) * mask).sum() / mask.sum()  # beta = 0: KL(teacher || student)
    assert loss == pytest.approx(ref.item(), rel=1e-4)


def test_teacher_prompt_column_conditions_only_the_teacher(tmp_path, student_dir, teacher_dir, tiny_tokenizer):
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    trainer = GeneralizedDistillationTrainer(
        model=student, teacher_model=teacher, processing_class=tiny_tokenizer, train_dataset=prompts(),
        args=cpu_args(tmp_path, alpha=1.0, beta=1.0),
    )
    batch = handmade_batch(tiny_tokenizer, seed=6)
    context = handmade_batch(tiny_tokenizer, seed=7, prompt_len=9)
    batch["teacher_prompt_ids"], batch["teacher_prompt_mask"] = context["prompt_ids"], context["prompt_mask"]
    student.train()
    loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    teacher_batch = {**batch, "prompt_ids": context["prompt_ids"], "prompt_mask": context["prompt_mask"]}
    ref = reference_divergence(
        completion_logits(student, batch), completion_logits(teacher, teacher_batch), batch["completion_mask"], 1.0
    )
    assert loss == pytest.approx(ref.item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Training behaviour
# ---------------------------------------------------------------------------------------------------------------------


def test_only_trainable_parameters_change(tmp_path, student_dir, teacher_dir):
    chosen = ["model.layers.1.mlp.down_proj.weight", r"model\.layers\.2\.mlp\.(gate|up)_proj\.weight"]
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(),
        args=cpu_args(tmp_path, trainable_parameters=chosen, weight_decay=0.1, lmbda=0.5, alpha=0.5),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    learned = {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.gate_proj.weight",
               "model.layers.2.mlp.up_proj.weight"}
    for name, p in trainer.model.named_parameters():
        if name in learned:
            assert not torch.equal(p, before[name]), f"{name} should have learned"
        else:
            assert torch.equal(p, before[name]), f"{name} must stay bit-identical"
    assert trainer.num_trainable_parameters == sum(before[n].numel() for n in learned)
    logged = trainer.state.log_history[0]
    for key in ("distill/loss", "distill/on_policy", "imitation/reward", "imitation/reward_semantic",
                "imitation/reward_edit", "trainable_parameters"):
        assert key in logged, key
    assert logged["trainable_parameters"] == trainer.num_trainable_parameters


def test_unknown_trainable_pattern_is_a_clear_error(tmp_path, student_dir, teacher_dir):
    with pytest.raises(ValueError, match="trainable_parameters.*matches no parameter"):
        GeneralizedDistillationTrainer(
            model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(),
            args=cpu_args(tmp_path, trainable_parameters=["model.layers.9.mlp.nothing"]),
        )


def test_lmbda_chooses_who_writes_the_sequences(tmp_path, student_dir, teacher_dir, tiny_tokenizer):
    completions = [[{"role": "assistant", "content": f"The river {i} is long and blue."}] for i in range(8)]
    ds = prompts().add_column("completion", completions)
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=ds,
        args=cpu_args(tmp_path, lmbda=0.0, seq_kd=False, alpha=1.0, max_completion_length=32),
    )
    trainer.model.train()
    inputs = [ds[i] for i in range(4)]
    out = trainer._generate_and_score_completions(inputs)
    assert trainer._metrics["train"]["distill/on_policy"] == [0.0]
    for row, example in zip(range(4), inputs):
        ids = out["completion_ids"][row][out["completion_mask"][row].bool()].tolist()
        text = tiny_tokenizer.decode(ids, skip_special_tokens=True)
        assert text == example["completion"][0]["content"]
        assert ids[-1] == tiny_tokenizer.eos_token_id
    trainer.args.lmbda = 1.0
    trainer._generate_and_score_completions(inputs)
    assert trainer._metrics["train"]["distill/on_policy"] == [0.0, 1.0]


def test_seq_kd_false_without_completions_fails_early(tmp_path, student_dir, teacher_dir):
    with pytest.raises(ValueError, match="'completion' column"):
        GeneralizedDistillationTrainer(
            model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(),
            args=cpu_args(tmp_path, lmbda=0.5, seq_kd=False),
        )


def test_imitation_rollouts_rewards_and_groups(tmp_path, student_dir, teacher_dir, tiny_tokenizer):
    from sleep_trl.rewards import edit_similarity

    seen = {}

    def judge(predictions, references):
        seen["pairs"] = list(zip(predictions, references))
        return [1.0 if i % 2 == 0 else 0.0 for i in range(len(predictions))]

    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(), semantic_judge=judge,
        args=cpu_args(tmp_path, alpha=0.0, gamma=0.25, num_imitation_generations=3, max_completion_length=10,
                      teacher_cache="off"),  # the per-batch path: teacher samples and cuts drawn per round
    )
    trainer.model.train()
    written = []
    real_sample = trainer.teachers.sample
    trainer.teachers.sample = lambda *a, **k: written.append(real_sample(*a, **k)) or written[-1]
    out = trainer._generate_and_score_completions([prompts()[i] for i in range(4)])
    assert out["imit_completion_ids"].shape[:2] == (4, 3)
    # one teacher call serves the distillation sequences and the imitation targets, with its hidden states
    [(teacher_samples, teacher_hidden)] = written
    assert "teacher_hidden_0" in out and [h.shape[0] for h in teacher_hidden] == [len(t) for t in teacher_samples]
    # distillation sequences of an alpha=0 batch are the teacher samples themselves
    for row in range(4):
        ids = out["completion_ids"][row][out["completion_mask"][row].bool()].tolist()
        assert ids == teacher_samples[row]
    # each rollout prompt = student prompt + a prefix of the teacher sample; rewards recomputed by hand
    r_sem = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(12)]).view(4, 3)
    r_abs = torch.zeros(4, 3)
    suffix_lengths = []
    for b in range(4):
        p_ids = out["prompt_ids"][b][out["prompt_mask"][b].bool()].tolist()
        for g in range(3):
            full = out["imit_prompt_ids"][b, g][out["imit_prompt_mask"][b, g].bool()].tolist()
            assert full[: len(p_ids)] == p_ids
            prefix = full[len(p_ids):]
            assert teacher_samples[b][: len(prefix)] == prefix
            suffix = teacher_samples[b][len(prefix):]
            assert len(suffix) >= 1
            cont = out["imit_completion_ids"][b, g][out["imit_completion_mask"][b, g].bool()].tolist()
            suffix_lengths.append(len(suffix))
            r_abs[b, g] = edit_similarity(cont, suffix)
    # continuations are bounded by the longest remaining target of the batch
    assert int(out["imit_completion_mask"].sum(-1).max()) <= max(suffix_lengths)
    rewards = 0.25 * r_sem + 0.75 * r_abs
    assert torch.allclose(out["imit_advantages"], group_advantages(rewards), atol=1e-5)
    assert len(seen["pairs"]) == 12


def test_model_card_is_written_on_save(tmp_path, student_dir, teacher_dir):
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(),
        args=cpu_args(tmp_path, max_steps=1, alpha=1.0),
    )
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "knowledge-seeding" in card and "sleep-trl" in card
    assert "2606.03979" in card and "@article{behrouz2026sleep" in card
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert "[None]" not in card and f"a local model (`{student_dir.name}`)" in card


def test_model_card_names_a_packaged_base_model_by_its_hub_repository(tmp_path, student_dir, teacher_dir):
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(),
        args=cpu_args(tmp_path, max_steps=1, alpha=1.0),
    )
    trainer.model.config._name_or_path = "smollm2-135m-instruct"  # as when loaded from the packaged copy
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in card
    assert trainer.model.config._name_or_path == "smollm2-135m-instruct"  # put back after the card


def test_self_seeding_through_a_peft_view_holds_one_copy(tmp_path, student_dir):
    from peft import LoraConfig

    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), train_dataset=prompts(),
        peft_config=LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False),
        args=cpu_args(tmp_path, teacher_view="disable_adapter", alpha=1.0, lmbda=1.0, max_steps=1),
    )
    assert trainer.teacher_model is None and trainer.teachers[0].is_view
    student_storage = {p.data_ptr() for p in trainer.model.parameters()}
    held = set()
    for t in trainer.teachers:
        if t.model is not None:
            held |= {p.data_ptr() for p in t.model.parameters()}
    assert held <= student_storage  # no second copy of any weight
    # the teacher view is the model without its adapter: the base model's distribution
    batch = handmade_batch(trainer._tokenizer, seed=8)
    base = AutoModelForCausalLM.from_pretrained(student_dir)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    unwrapped = trainer.model
    with torch.no_grad():
        [h_view] = trainer.teachers.hidden_states(unwrapped, ids, mask, 6)
        h_base = base.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -7:-1]
        h_student = trainer._get_last_hidden_state(unwrapped, ids, mask, 6)
    assert torch.allclose(h_view, h_base, atol=1e-5)
    assert not torch.allclose(h_student, h_base, atol=1e-3)  # the adapter does change the student
    trainer.train()


@pytest.mark.parametrize(
    "field,value,match",
    [("lmbda", 1.5, "lmbda"), ("alpha", -0.1, "alpha"), ("teacher_combination", "max", "teacher_combination"),
     ("edit_distance_unit", "word", "edit_distance_unit"), ("teacher_view", "copy", "teacher_view")],
)
def test_config_rejects_bad_values_naming_the_field(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        cpu_args(tmp_path, **{field: value})


def test_gamma_needs_a_judge(tmp_path):
    with pytest.raises(ValueError, match="semantic_judge"):
        cpu_args(tmp_path, alpha=0.5, gamma=0.5, semantic_judge=None)


def mid_sleep(model_dir, slow_gate="fixed", fast_std=None, warm_start=False):
    """A tiny model in the middle of a sleep: a fast expert (random weights of std `fast_std`, else as unlocked),
    suspended, and a newly expanded slow expert (a copy of the fast one with `warm_start`), the only one that
    trains. Returns the model, its memory and the new expert's parameter names."""
    from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    mem = attach_memory(model, MemoryConfig(levels=[LevelConfig("fast", num_slots=1, rank=4, gate="fixed"),
                                                    LevelConfig("slow", num_slots=2, rank=4, gate=slow_gate)]))
    mem.expand("fast")
    if fast_std is not None:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in mem.parameters("fast", slots=[0]):
                p.copy_(torch.randn(p.shape, generator=gen) * fast_std)
    names = mem.expand("slow")
    if warm_start:
        mem.copy_slot(("fast", 0), ("slow", 0))
    mem.suspend("fast")
    return model, mem, names


def test_replay_rows_are_taught_by_the_long_term_memory(tmp_path, tiny_dir, tiny_tokenizer):
    """Consolidation with replay: new rows are taught by the awake model (fast level on), replayed rows by the
    long-term memory before this sleep (fast level silent), both without a second copy of the weights."""
    model, mem, names = mid_sleep(tiny_dir("replay_llama", arch="llama", seed=7), fast_std=0.5)
    data = prompts().add_column("replay", [i % 2 == 1 for i in range(8)])
    trainer = GeneralizedDistillationTrainer(
        model=model, processing_class=tiny_tokenizer, train_dataset=data,
        args=cpu_args(tmp_path, teacher_view="memory", alpha=1.0, trainable_parameters=names, max_steps=1),
    )
    batch = handmade_batch(tiny_tokenizer, seed=9, batch=4)
    replay = torch.tensor([False, True, False, True])
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        [mixed] = trainer.teachers.hidden_states(model, ids, mask, 6, replay)
        with mem.teacher_view():
            awake = trainer._get_last_hidden_state(model, ids, mask, 6)
        asleep = trainer._get_last_hidden_state(model, ids, mask, 6)  # new slot has B = 0: the long-term memory
    assert torch.allclose(mixed[~replay], awake[~replay], atol=1e-5)
    assert torch.allclose(mixed[replay], asleep[replay], atol=1e-5)
    assert not torch.allclose(awake, asleep, atol=1e-3)

    # the memory's per-row view serves new and replayed rows in one generate call (no split)
    calls = []
    real_generate = trainer.teachers.hf_generate

    def counting_generate(model, prompt_ids, **kwargs):
        with kwargs["view"]():
            calls.append((len(prompt_ids), dict(mem.state.row_scale)))
        return real_generate(model, prompt_ids, **kwargs)

    trainer.teachers.hf_generate = counting_generate
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    assert len(trainer.teachers.sample(prompt_ids, replay.tolist(), random.Random(0))) == 4
    [(rows, scale)] = calls
    assert rows == 4 and torch.equal(scale["fast"], (~replay).float())  # the fast level silent on replayed rows
    assert mem.state.row_scale == {}  # and only inside the call

    # under ZeRO-3 too there is one teacher forward for the whole batch (no dummy row, nothing to wait for)
    forwards = []
    real_hidden = trainer._get_last_hidden_state

    def counting_hidden(model, ids_, mask_, keep):
        forwards.append(ids_.size(0))
        return real_hidden(model, ids_, mask_, keep)

    trainer._get_last_hidden_state = counting_hidden
    trainer.is_deepspeed_enabled = True
    none = torch.zeros(4, dtype=torch.bool)
    with torch.no_grad():
        [lone] = trainer.teachers.hidden_states(model, ids, mask, 6, none)
        [mixed_again] = trainer.teachers.hidden_states(model, ids, mask, 6, replay)
    trainer.is_deepspeed_enabled = False
    trainer._get_last_hidden_state = real_hidden
    trainer.teachers.hf_generate = real_generate
    assert forwards == [4, 4]
    torch.testing.assert_close(mixed_again, mixed, atol=1e-6, rtol=0)
    torch.testing.assert_close(lone, awake, atol=1e-5, rtol=0)
    trainer.train()
    assert trainer.state.global_step == 1


def greedy_memory_teacher(tmp_path, tiny_dir, tiny_tokenizer, name, max_completion_length):
    """A trainer mid-sleep whose teacher is the memory view (per-row for replayed rows), sampling greedily, so two
    ways of generating must write the same tokens. Returns the model, its memory and the trainer."""
    model, mem, names = mid_sleep(tiny_dir(name, arch="llama", seed=7), fast_std=0.5)
    data = prompts().add_column("replay", [i % 2 == 1 for i in range(8)])
    trainer = GeneralizedDistillationTrainer(
        model=model, processing_class=tiny_tokenizer, train_dataset=data,
        args=cpu_args(tmp_path, teacher_view="memory", alpha=1.0, trainable_parameters=names, max_steps=1,
                      max_completion_length=max_completion_length),
    )
    trainer.generation_config.do_sample = False
    return model, mem, trainer


def test_a_prompt_sampled_several_times_is_read_once_with_the_same_samples(tmp_path, tiny_dir, tiny_tokenizer):
    """Teacher samples of a batch that repeats prompts (as the teacher cache's fill does) read each distinct prompt
    once: the first forward runs on the distinct prompts only, and the completions and captured hidden states equal
    `generate` over every copy. A prompt repeated as a new and as a replayed row is two prompts (two views)."""
    model, mem, trainer = greedy_memory_teacher(tmp_path, tiny_dir, tiny_tokenizer, "shared_llama", 5)
    batch = handmade_batch(tiny_tokenizer, seed=9, batch=3)
    distinct = [row[m.bool()].tolist() for row, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    rows = [0, 0, 0, 1, 1, 2, 0, 0]
    replay = [False, False, False, True, True, False, True, True]  # prompt 0 as a new and as a replayed row
    prompt_ids = [distinct[r] for r in rows]
    layer0 = model.model.layers[0]
    seen = []
    hook = layer0.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[:2]),
        with_kwargs=True,
    )
    scales = []
    real_prefill = teachers_module.prefill_cache
    teachers_module.prefill_cache = lambda *a: scales.append(mem.state.row_scale["fast"].clone()) or real_prefill(*a)
    try:
        out = {}
        for shared in (True, False):
            trainer.args.teacher_shared_prefill = shared
            seen.clear()
            out[shared] = trainer.teachers.sample(prompt_ids, replay, random.Random(0), capture_hidden=True)
            out[shared, "first"] = seen[0]
    finally:
        hook.remove()
        teachers_module.prefill_cache = real_prefill
    width = max(len(p) for p in distinct)
    assert out[True, "first"] == (4, width - 1)  # 4 distinct (prompt, view) pairs, all but the last prompt token
    assert out[False, "first"] == (8, width)
    [scale] = scales  # the prefill ran in the per-row view of the distinct rows: the replayed copy of prompt 0 silent
    assert torch.equal(scale, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    (ids_shared, hidden_shared), (ids_plain, hidden_plain) = out[True], out[False]
    assert ids_shared == ids_plain
    for a, b in zip(hidden_shared, hidden_plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(hidden_plain[0], hidden_plain[6], atol=1e-3)  # the two views of prompt 0 differ
    assert mem.state.row_scale == {}


def test_sampling_in_rounds_drops_ended_rows_and_writes_the_same_samples(tmp_path, tiny_dir, tiny_tokenizer):
    """`teacher_sampling_rounds`: rows are sampled 8 tokens at a time and only the rows that have not ended go on
    (their tokens so far read again); completions and captured hidden states equal one `generate` over 20 tokens,
    in a per-row memory view that follows the surviving rows."""
    model, mem, trainer = greedy_memory_teacher(tmp_path, tiny_dir, tiny_tokenizer, "rounds_llama", 20)
    batch = handmade_batch(tiny_tokenizer, seed=4, batch=6)
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    replay = [False, True, False, True, True, False]

    def sample(rounds):
        trainer.args.teacher_sampling_rounds = rounds
        return trainer.teachers.sample(prompt_ids, replay, random.Random(0), capture_hidden=True)

    # An end-of-sequence token that some rows write early and others never: their rounds then differ.
    plain, _ = sample("off")
    stop = plain[0][2]
    ended = [i for i, row in enumerate(plain) if stop in row[:8]]  # rows that end in round one
    assert 0 < len(ended) < 6 and any(stop not in row for row in plain), plain
    trainer.eos_token_ids = [stop]
    trainer.generation_config.eos_token_id = [stop]
    trainer.args.teacher_sampling_rounds = "on"
    assert trainer.teachers.sampling_rounds() == [8, 12]
    calls = []
    real_generate = model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"].shape) or real_generate(**kw)
    try:
        out = {rounds: sample(rounds) for rounds in ("on", "off")}
    finally:
        del model.generate
    # "on": 6 rows, then those that had not ended, their prompt and 8 tokens read again; "off": one call
    width = batch["prompt_ids"].size(1)
    assert [tuple(c) for c in calls] == [(6, width), (6 - len(ended), width + 8), (6, width)]
    (ids_on, hidden_on), (ids_off, hidden_off) = out["on"], out["off"]
    assert ids_on == ids_off and len(ids_on[0]) == 3 and ids_on[0][-1] == stop
    assert max(len(c) for c in ids_on) == 20
    for a, b in zip(hidden_on, hidden_off, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert mem.state.row_scale == {}


def test_replay_rows_of_a_peft_view_need_no_separate_call(tmp_path, student_dir):
    """With `disable_adapter` the replay view is the teacher view: replayed rows share its generate call."""
    from peft import LoraConfig

    data = prompts().add_column("replay", [i % 2 == 1 for i in range(8)])
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), train_dataset=data,
        peft_config=LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False),
        args=cpu_args(tmp_path, teacher_view="disable_adapter", alpha=1.0, max_steps=1),
    )
    assert not trainer.teachers[0].splits_replay
    calls = []
    real_generate = trainer.teachers.hf_generate
    trainer.teachers.hf_generate = lambda model, ids, **kw: calls.append(len(ids)) or real_generate(model, ids, **kw)
    batch = handmade_batch(trainer._tokenizer, seed=9, batch=4)
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    assert len(trainer.teachers.sample(prompt_ids, [False, True, False, True], random.Random(0))) == 4
    assert calls == [4]


def test_replay_rows_need_a_teacher_view(tmp_path, student_dir, teacher_dir):
    data = prompts().add_column("replay", [True] * 8)
    with pytest.raises(ValueError, match="replay"):
        GeneralizedDistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=data,
                                       args=cpu_args(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# The teacher cache: the frozen teacher's samples and hidden states computed once
# ---------------------------------------------------------------------------------------------------------------------


def test_teacher_cache_gives_every_occurrence_its_own_sample(tmp_path, student_dir, teacher_dir):
    """4 prompts, batch 4, 3 steps: each prompt is drawn 3 times and gets 3 different cached samples; the cache
    is filled once, before the first step, and nothing else samples the teacher."""
    data = prompts(4)
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=data,
        args=cpu_args(tmp_path, lmbda=0.0, alpha=1.0, max_steps=3, max_completion_length=6),
    )
    assert trainer.uses_teacher_cache
    fills = []
    real_sample = trainer.teachers.sample
    trainer.teachers.sample = lambda ids, *a, **k: fills.append(len(ids)) or real_sample(ids, *a, **k)
    trainer.train()
    cache = trainer._teacher_cache
    assert fills == [12]  # one batched call for 4 prompts x 3 samples, during the first step only
    assert len(cache.samples) == 4 and all(len(pool) == 3 for pool in cache.samples.values())
    assert all(n == 3 for n in cache.uses.values())  # every sample used exactly once
    assert all(s.hidden is not None and s.hidden[0].shape[0] == len(s.completion)
               for pool in cache.samples.values() for s in pool)


def test_a_prompt_the_dataset_repeats_gets_as_many_cached_samples_as_it_is_drawn(tmp_path, student_dir, teacher_dir):
    """A sleep with `new_prompt_share` repeats the new session's rows: a prompt filling 3 of 8 rows is drawn 3 times
    as often over the 2 epochs of 4 steps x 4 (6 times), and gets 6 samples; each sample is used once."""
    texts = [f"Tell me about the river number {i}." for i in (0, 0, 0, 1, 2, 3, 4, 5)]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=data,
        args=cpu_args(tmp_path, lmbda=0.0, alpha=1.0, max_steps=4, max_completion_length=4),
    )
    trainer.train()
    cache = trainer._teacher_cache
    assert sorted(len(pool) for pool in cache.samples.values()) == [2, 2, 2, 2, 2, 6]
    assert all(cache.uses[key] == len(pool) for key, pool in cache.samples.items())  # every sample used once


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_cached_teacher_hidden_states_give_the_loss_of_a_fresh_teacher_forward(tmp_path, student_dir, teacher_dir,
                                                                               cache):
    """The teacher's hidden states taken from its own generation (filled into the cache, or captured while sampling
    a batch) give the divergence a fresh teacher forward gives."""
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(4),
        args=cpu_args(tmp_path, lmbda=0.0, alpha=1.0, beta=0.5, max_completion_length=8, teacher_cache=cache),
    )
    trainer.model.train()
    batch = trainer._generate_and_score_completions([prompts(4)[i] for i in range(4)])
    assert "teacher_hidden_0" in batch  # an off-policy batch carries the teacher's cached hidden states
    fresh = {k: v for k, v in batch.items() if not k.startswith("teacher_hidden_")}
    student = trainer.model
    with torch.no_grad():
        cached_loss = trainer._distillation_loss(student, batch, batch["num_items_in_batch"])[0]
        fresh_loss = trainer._distillation_loss(student, fresh, fresh["num_items_in_batch"])[0]
    torch.testing.assert_close(cached_loss, fresh_loss, atol=1e-5, rtol=1e-5)
    assert cached_loss > 0


def test_imitation_targets_and_cuts_come_from_the_cache(tmp_path, student_dir, teacher_dir):
    """With the cache, each imitation prompt is the student prompt plus the cached sample up to its cut, and the
    judge's embeddings of the teacher's text are made once, when the cache is filled."""
    embedded = []

    class CountingJudge:
        def embed(self, texts):
            embedded.append(len(texts))
            return torch.eye(len(texts), 4)[:, :4] if texts else torch.zeros(0, 4)

        def compare(self, a, b):
            return [1.0] * a.shape[0]

        def __call__(self, p, r):  # never used when embeddings are cached
            raise AssertionError("the judge re-embedded the teacher's text")

    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(4), semantic_judge=CountingJudge(),
        args=cpu_args(tmp_path, lmbda=1.0, alpha=0.5, gamma=0.5, num_imitation_generations=2, max_completion_length=8),
    )
    trainer.model.train()
    out = trainer._generate_and_score_completions([prompts(4)[i] for i in range(4)])
    cache = trainer._teacher_cache
    n_cached = len(cache)
    assert embedded[0] == n_cached  # all teacher suffixes at once, when the cache was filled
    taken = [pool[0] for pool in cache.samples.values()]
    for b in range(4):
        p_ids = out["prompt_ids"][b][out["prompt_mask"][b].bool()].tolist()
        full = out["imit_prompt_ids"][b, 0][out["imit_prompt_mask"][b, 0].bool()].tolist()
        sample = next(s for s in taken if full == p_ids + s.completion[: s.cut])
        assert 1 <= len(sample.completion) - sample.cut
    assert embedded[1:] == [8]  # then only the student's 4 x 2 continuations


def test_teacher_cache_only_when_the_teacher_cannot_change(tmp_path, student_dir, tiny_dir, tiny_tokenizer):
    from peft import LoraConfig

    peft = GeneralizedDistillationTrainer(
        model=str(student_dir), train_dataset=prompts(), peft_config=LoraConfig(r=2, target_modules=["down_proj"]),
        args=cpu_args(tmp_path, teacher_view="disable_adapter", alpha=1.0, max_steps=1),
    )
    assert peft.uses_teacher_cache  # only adapter weights train: the base model (the teacher) is frozen
    context = GeneralizedDistillationTrainer(
        model=str(student_dir), train_dataset=prompts().add_column("teacher_prompt", prompts()["prompt"]),
        args=cpu_args(tmp_path, teacher_view="self", alpha=1.0, max_steps=1),
    )
    assert not context.uses_teacher_cache  # the teacher is the student as it trains
    model, mem, names = mid_sleep(tiny_dir("cache_llama", arch="llama", seed=11))

    def trainer_for(trainable, cache="auto"):
        return GeneralizedDistillationTrainer(
            model=model, processing_class=tiny_tokenizer, train_dataset=prompts(),
            args=cpu_args(tmp_path, teacher_view="memory", alpha=1.0, max_steps=1, trainable_parameters=trainable,
                          teacher_cache=cache),
        )

    assert trainer_for(names).uses_teacher_cache
    # the view still shows the fast level: training it would change the teacher
    fast = mem.names(mem.parameters("fast", slots=[0]))
    assert not trainer_for(names + fast).uses_teacher_cache
    assert not trainer_for(names, cache="off").uses_teacher_cache


def loss_and_grads_with(trainer, batch, flag: str, value: bool):
    """`_compute_loss` and the student's gradients on `batch` with `trainer.args.<flag> = value`."""
    setattr(trainer.args, flag, value)
    student = trainer.model
    student.zero_grad()
    loss = trainer._compute_loss(student, dict(batch), batch["num_items_in_batch"])[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lmbda", [0.0, 1.0], ids=["teacher-written", "on-policy"])
def test_shared_prefix_rows_give_the_losses_and_gradients_of_separate_rows(tmp_path, student_dir, teacher_dir, lmbda):
    """One packed forward for the distillation sequence and the G continuations of each prompt computes the same
    loss and gradient as G + 1 rows of their own: with the prefix inside the teacher sample (teacher-written
    batches) and as a segment of its own (on-policy batches, where the sequence is the student's)."""
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(4),
        args=cpu_args(tmp_path, alpha=0.5, lmbda=lmbda, gamma=0.0, num_imitation_generations=3,
                      max_completion_length=8, trainable_parameters=[r"model\.layers\.[12]\.mlp\..*"]),
    )
    trainer.model.train()
    batch = trainer._generate_and_score_completions([prompts(4)[i] for i in range(4)])
    assert bool(batch["imit_shares_sequence"].all()) == (lmbda == 0.0)
    shared_loss, shared_grads = loss_and_grads_with(trainer, batch, "imitation_prefix_sharing", True)
    separate_loss, separate_grads = loss_and_grads_with(trainer, batch, "imitation_prefix_sharing", False)
    torch.testing.assert_close(shared_loss, separate_loss, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == separate_grads.keys() and shared_grads
    for name in shared_grads:
        torch.testing.assert_close(shared_grads[name], separate_grads[name], atol=1e-5, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for g in shared_grads.values())


def test_continuations_from_one_cached_prefix_equal_repeated_prompts(tiny_tokenizer):
    """Greedy decoding from a prefix's KV cache repeated along the batch equals decoding each repeat on its own."""
    from transformers import GenerationConfig

    from sleep_trl.generation.hf import generate_ids, left_pad, prefill_cache, sample_continuations
    from sleep_trl.tiny import build_model

    model = build_model(tiny_tokenizer, arch="llama", seed=3).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # decisive, varied greedy choices (see test_eval_qa)
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if "norm" in name else 0.0))
    prefixes = [[5, 17, 230, 44], [9, 300], [12, 13, 14, 15, 16, 17], [40]]
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    eos = [tiny_tokenizer.eos_token_id]
    shared = sample_continuations(model, prefixes, 3, pad_id=tiny_tokenizer.pad_token_id, eos_token_ids=eos,
                                  generation_config=config)
    repeated = generate_ids(model, [p for p in prefixes for _ in range(3)], pad_id=tiny_tokenizer.pad_token_id,
                            batch_size=12, max_new_tokens=6, do_sample=False, eos_token_ids=eos)
    assert shared == repeated and len({tuple(c) for c in shared}) > 1
    # the prefix really is in the cache (transformers before 5.18 takes it as `past_key_values` and ignores `cache`)
    ids, mask = left_pad(prefixes, tiny_tokenizer.pad_token_id)
    [cache] = prefill_cache(model, ids, mask).values()
    assert cache.get_seq_length() == ids.size(1) - 1


def test_fewer_prompts_than_one_batch_still_train_every_step(tmp_path, student_dir, teacher_dir, tiny_tokenizer):
    """TRL's sampler serves whole batches only: 3 prompts for a batch of 4 gave zero steps. Repeated to fill a batch,
    the trainer runs its `max_steps` and the student's weights move."""
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with pytest.warns(UserWarning, match="3 rows, fewer than one generation batch \\(4\\)"):
        trainer = GeneralizedDistillationTrainer(
            model=student, teacher_model=str(teacher_dir), args=cpu_args(tmp_path, alpha=1.0, lmbda=0.0),
            train_dataset=prompts(3), processing_class=tiny_tokenizer,
        )
    assert len(trainer.train_dataset) == 6
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())


def test_router_gate_loss_hand_values():
    # 2 layers, 2 rows (row 1 replayed), 3 tokens (the last token of row 0 is padding)
    g = [torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.4, 0.6]]), torch.tensor([[0.8, 0.7, 0.3], [0.1, 0.3, 0.5]])]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    replay = torch.tensor([False, True])
    new = -(math.log(0.9) + math.log(0.5) + math.log(0.8) + math.log(0.7)) / 4
    old = -sum(math.log(1 - x) for x in (0.2, 0.4, 0.6, 0.1, 0.3, 0.5)) / 6
    assert router_gate_loss(g, mask, replay).item() == pytest.approx((new + old) / 2, rel=1e-6)
    assert router_gate_loss(g, mask, torch.tensor([False, False])).item() == pytest.approx(
        -(math.log(0.9) + math.log(0.5) + math.log(0.8) + math.log(0.7) + sum(
            math.log(x) for x in (0.2, 0.4, 0.6, 0.1, 0.3, 0.5))) / 10, rel=1e-6)
    assert router_gate_loss(g, torch.zeros(2, 3), replay).item() == 0.0


def routed_sleep(tiny_dir):
    """Mid-sleep with a routed slow level, the new expert warm-started from the fast one (gate 0.99)."""
    return mid_sleep(tiny_dir("router_llama", arch="llama", seed=3), slow_gate="sigmoid", fast_std=0.5,
                     warm_start=True)


def mean_gates(mem, model, tokenizer, texts):
    """The new expert's mean gate where the answer starts (the last prompt token), over layers and prompts."""
    out = []
    for t in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": t}], return_tensors="pt", return_dict=True,
                                            add_generation_prompt=True)
        with torch.no_grad(), mem.recording_gates() as gates:
            model(**ids)
        out += [g[0, -1].item() for g in gates]
    return sum(out) / len(out)


def test_router_loss_teaches_the_new_expert_to_stay_quiet_on_replayed_rows(tmp_path, tiny_dir, tiny_tokenizer):
    """With `router_loss_weight`, the new expert's gate falls on replayed prompts and stays open on new ones; the
    loss adds exactly the weight times the gate cross-entropy to the distillation loss; without replayed rows the
    term is off."""
    # new knowledge is about rivers, the replayed old knowledge about mountains (the router must tell them apart)
    texts = [f"Tell me about the river number {i}." if i % 2 == 0 else f"Which mountain is the highest, {i}?"
             for i in range(8)]
    replay = [i % 2 == 1 for i in range(8)]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts], "replay": replay})
    old_texts = [t for t, r in zip(texts, replay) if r]
    new_texts = [t for t, r in zip(texts, replay) if not r]
    after = {}
    for weight in (0.0, 1.0):
        model, mem, names = routed_sleep(tiny_dir)
        trainer = GeneralizedDistillationTrainer(
            model=model, processing_class=tiny_tokenizer, train_dataset=data,
            args=cpu_args(tmp_path / str(weight), teacher_view="memory", alpha=1.0, lmbda=0.0,
                          trainable_parameters=names, max_steps=16, learning_rate=1e-1, router_loss_weight=weight),
        )
        assert (trainer._router_memory is not None) == (weight > 0)
        before = mean_gates(mem, model, tiny_tokenizer, old_texts)
        trainer.train()
        after[weight] = (mean_gates(mem, model, tiny_tokenizer, old_texts),
                         mean_gates(mem, model, tiny_tokenizer, new_texts))
        logged = [h for h in trainer.state.log_history if "router/loss" in h]
        assert bool(logged) == (weight > 0)
    assert before == pytest.approx(0.99, abs=1e-4)
    # measured: without the term both stay at 0.9995; with it 0.35 on replayed prompts, 0.60 on new ones
    (old_off, new_off), (old_on, new_on) = after[0.0], after[1.0]
    assert old_on < old_off - 0.3  # the router learned to close on replayed prompts
    assert new_on - old_on > (new_off - old_off) + 0.15  # more than on new ones: it tells them apart

    # the term is weight x the gate cross-entropy, added to the distillation loss
    model, mem, names = routed_sleep(tiny_dir)
    trainer = GeneralizedDistillationTrainer(
        model=model, processing_class=tiny_tokenizer, train_dataset=data,
        args=cpu_args(tmp_path / "exact", teacher_view="memory", alpha=1.0, trainable_parameters=names,
                      router_loss_weight=0.5),
    )
    batch = handmade_batch(tiny_tokenizer, seed=4, batch=4)
    batch["replay_mask"] = torch.tensor([False, True, False, True])
    with torch.no_grad():
        loss, _, _ = trainer._compute_loss(model, dict(batch), None)
        trainer._router_memory = None
        distill, _, _ = trainer._compute_loss(model, dict(batch), None)
        with mem.recording_gates() as gates:
            model(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                  attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1))
    P, K = batch["prompt_ids"].size(1), batch["completion_ids"].size(1)
    mask = torch.zeros(4, P + K, dtype=torch.bool)
    mask[:, P - 1 : P + K - 1] = batch["completion_mask"].bool()  # the positions that predict the completion
    g, old = torch.stack(gates), batch["replay_mask"][:, None]
    reference = (-torch.log(1 - g[:, mask & old]).mean() - torch.log(g[:, mask & ~old]).mean()) / 2
    assert (loss - distill).item() == pytest.approx(0.5 * reference.item(), rel=1e-4)

    # nothing to stay quiet on: a sleep without replayed rows has no router term
    model, mem, names = routed_sleep(tiny_dir)
    trainer = GeneralizedDistillationTrainer(
        model=model, processing_class=tiny_tokenizer, train_dataset=prompts(),
        args=cpu_args(tmp_path / "none", teacher_view="memory", alpha=1.0, trainable_parameters=names,
                      router_loss_weight=1.0),
    )
    assert trainer._router_memory is None


def test_router_loss_needs_a_routed_newest_expert(tmp_path, tiny_dir, tiny_tokenizer):
    with pytest.raises(ValueError, match="router_loss_weight.*teacher_view: memory"):
        cpu_args(tmp_path, router_loss_weight=1.0)
    with pytest.raises(ValueError, match="router_loss_weight"):
        cpu_args(tmp_path, router_loss_weight=-1.0, teacher_view="memory")
    model, _, names = mid_sleep(tiny_dir("router_fixed", arch="llama", seed=3))
    with pytest.raises(ValueError, match="slow_gate: sigmoid"):
        GeneralizedDistillationTrainer(
            model=model, processing_class=tiny_tokenizer, train_dataset=prompts().add_column("replay", [True] * 8),
            args=cpu_args(tmp_path, teacher_view="memory", alpha=1.0, trainable_parameters=names,
                          router_loss_weight=1.0),
        )


def test_router_loss_is_the_same_from_packed_rows(tmp_path, tiny_dir, tiny_tokenizer):
    """With the Learning-to-Imitate term and prefix sharing, the student's gates come from one packed forward of the
    distillation sequence and its continuations; the router term read there (at `PackedRows.sequence_index`) equals
    the one of the plain `[prompt | completion]` forward, in value and in gradient."""
    model, mem, names = routed_sleep(tiny_dir)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a router that reads the token (it starts at zero weight: the same gate everywhere)
        for n, p in model.named_parameters():
            if n in names and "router_" in n and "bias" not in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0)
    data = prompts(4).add_column("replay", [False, True, False, True])
    trainer = GeneralizedDistillationTrainer(
        model=model, processing_class=tiny_tokenizer, train_dataset=data,
        args=cpu_args(tmp_path, teacher_view="memory", alpha=0.5, lmbda=0.0, gamma=0.0, num_imitation_generations=2,
                      max_completion_length=6, trainable_parameters=names, router_loss_weight=0.5),
    )
    model.train()
    batch = trainer._generate_and_score_completions([data[i] for i in range(4)])
    assert batch["replay_mask"].tolist() == [False, True, False, True] and bool(batch["imit_shares_sequence"].all())

    def router_and_grads(shared: bool):
        trainer.args.imitation_prefix_sharing = shared
        model.zero_grad()
        inputs = dict(batch)
        trainer._compute_loss(model, inputs, batch["num_items_in_batch"])
        router = inputs["loss_parts"]["router/loss"]
        model.zero_grad()
        with mem.recording_gates() as gates:  # the router term alone, for its gradient
            inputs = dict(batch)
            if shared:
                _, _, positions = trainer._packed_student_hidden(model, inputs)
            else:
                positions = None
                model(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                      attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1))
        term = router_gate_loss(gates, trainer._answer_positions(batch, positions, gates[0].size(1)),
                                batch["replay_mask"])
        term.backward()
        return router, term.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed, packed_term, packed_grads = router_and_grads(True)
    plain, plain_term, plain_grads = router_and_grads(False)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, packed_term, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain, plain_term, atol=1e-6, rtol=1e-6)
    assert packed_grads.keys() == plain_grads.keys() and any("router" in n for n in packed_grads)
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for g in packed_grads.values())


def test_the_students_shared_prompt_prefix_read_once_gives_the_same_loss_and_gradients(tmp_path, student_dir,
                                                                                      teacher_dir):
    """Chat prompts start with the same template tokens: with `student_shared_prefix` the student's distillation
    forward reads them once (KV cache repeated along the batch) and gets the plain forward's loss and gradients."""
    trainer = GeneralizedDistillationTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=prompts(4),
        args=cpu_args(tmp_path, alpha=1.0, lmbda=0.0, max_completion_length=8,
                      trainable_parameters=[r"model\.layers\.[12]\.mlp\..*"]),
    )
    trainer.model.train()
    batch = trainer._generate_and_score_completions([prompts(4)[i] for i in range(4)])
    plain_loss, plain_grads = loss_and_grads_with(trainer, batch, "student_shared_prefix", False)
    assert trainer._shared_prefix_batches == 0
    shared_loss, shared_grads = loss_and_grads_with(trainer, batch, "student_shared_prefix", True)
    assert trainer._shared_prefix_batches == 1
    torch.testing.assert_close(shared_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == plain_grads.keys() and shared_grads
    for name in plain_grads:
        assert (shared_grads[name] - plain_grads[name]).norm() <= 1e-5 * plain_grads[name].norm(), name
    assert any(float(g.abs().sum()) > 0 for g in plain_grads.values())
