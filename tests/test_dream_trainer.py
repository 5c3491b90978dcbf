"""DreamTrainer on tiny models: policy updates (ReST-EM, GRPO), isolation inside the trainer, checks, a real run."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset
from trl import GRPOTrainer

import sleep_trl.trainers.dream_trainer as dream_trainer_module
from sleep_trl.dreaming.inner_loop import DreamEvaluation
from sleep_trl.dreaming.passages import demo_tasks
from sleep_trl.dreaming.sft_data import encode_example
from sleep_trl.tiny import build_model
from sleep_trl.trainers.dream_config import DreamConfig
from sleep_trl.trainers.dream_trainer import DreamTrainer

M = 4  # dreams per context


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(demo_tasks(2))


def make_trainer(tmp_path, tiny_tokenizer, dataset, peft_config=None, **overrides):
    kwargs = {
        "num_dreams": M,
        "per_device_train_batch_size": M,
        "max_completion_length": 12,
        "max_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "tau_metric": "contains",
        "tau_max_new_tokens": 6,
        "inner_steps": 2,
        "inner_lora_r": 4,
        "inner_lora_alpha": 8,
        "num_dreams_to_print": 0,
        "seed": 0,
    }
    kwargs.update(overrides)
    args = DreamConfig(str(tmp_path / "out"), **kwargs)
    trainer = DreamTrainer(
        build_model(tiny_tokenizer, seed=0),
        args=args,
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
        peft_config=peft_config,
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


@pytest.fixture
def fixed_rewards(monkeypatch):
    """Replace the inner loop by fixed rewards (in the order the dreams reach it), to test the policy update alone."""
    box = {}

    def fake(model, tiny_tokenizer, tau, tasks, dreams, tau_before, config=None, progress=False):
        rewards = box["rewards"][: len(dreams)]
        return [DreamEvaluation(r, b, b + r, 0.0, 0.0, 1) for r, b in zip(rewards, tau_before, strict=True)]

    monkeypatch.setattr(dream_trainer_module, "evaluate_dreams", fake)
    return box


def group_inputs(trainer, index=0):
    """One group as GRPOTrainer's sampler hands it over: the same task (with its dream prompt) m times."""
    return [dict(trainer.train_dataset[index]) for _ in range(M)]


def param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def completion_nll(model, prompt_ids, prompt_mask, completion_ids, completion_mask, row):
    p = prompt_ids[row][prompt_mask[row].bool()]
    c = completion_ids[row][completion_mask[row].bool()]
    logits = model(input_ids=torch.cat([p, c])[None]).logits[0]
    logp = torch.log_softmax(logits[len(p) - 1 : len(p) + len(c) - 1].float(), dim=-1)
    return -logp.gather(-1, c[:, None]).sum(), len(c)


@pytest.mark.parametrize("rehearsal_coef", [0.0, 1.0])
def test_rest_em_gradient_is_sft_gradient_on_rewarded_dreams(
    tmp_path, tiny_tokenizer, dataset, fixed_rewards, rehearsal_coef
):
    trainer = make_trainer(tmp_path, tiny_tokenizer, dataset, policy_update="rest_em", rehearsal_coef=rehearsal_coef)
    fixed_rewards["rewards"] = [1.0, 0.0, 1.0, 0.0]
    batch = trainer._generate_and_score_completions(group_inputs(trainer))
    assert batch["advantages"].tolist() == [1.0, 0.0, 1.0, 0.0]
    model = trainer.model

    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got = param_grads(model)

    # Hand reference: token-mean SFT loss of the completions of the rewarded dreams only (prompt -> dream), plus,
    # for rehearsal, the token-mean LM loss of the same dreams' text.
    model.zero_grad(set_to_none=True)
    kept = [0, 2]
    total, count = 0.0, 0
    for row in kept:
        nll, n = completion_nll(
            model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"], row
        )
        total, count = total + nll, count + n
    reference = total / count
    if rehearsal_coef:
        texts = trainer._dream_batch["texts"]
        r_total, r_count = 0.0, 0
        for row in kept:
            ids = torch.tensor(encode_example(tiny_tokenizer, "", texts[row], trainer.args.max_dream_tokens)[0])
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), dim=-1)
            r_total = r_total - logp.gather(-1, ids[1:, None]).sum()
            r_count += len(ids) - 1
        reference = reference + rehearsal_coef * r_total / r_count
    reference.backward()
    expected = param_grads(model)

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_rest_em_without_rewarded_dreams_has_zero_gradient(tmp_path, tiny_tokenizer, dataset, fixed_rewards):
    trainer = make_trainer(tmp_path, tiny_tokenizer, dataset, policy_update="rest_em")
    fixed_rewards["rewards"] = [0.0, 0.0, 0.0, 0.0]
    batch = trainer._generate_and_score_completions(group_inputs(trainer))
    trainer.model.zero_grad(set_to_none=True)
    trainer.compute_loss(trainer.model, batch).backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_grpo_advantages_are_group_normalised_and_nonzero_when_rewards_differ(
    tmp_path, tiny_tokenizer, dataset, fixed_rewards
):
    trainer = make_trainer(tmp_path, tiny_tokenizer, dataset, policy_update="grpo", rehearsal_coef=0.0)
    fixed_rewards["rewards"] = [1.0, 0.0, 1.0, 0.0]
    batch = trainer._generate_and_score_completions(group_inputs(trainer))
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    expected = (r - r.mean()) / (r.std() + 1e-4)  # GRPO: unbiased std over the group
    torch.testing.assert_close(batch["advantages"], expected)
    assert torch.all(batch["advantages"] != 0)
    trainer.model.zero_grad(set_to_none=True)
    trainer.compute_loss(trainer.model, batch).backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in trainer.model.parameters() if p.grad is not None)

    fixed_rewards["rewards"] = [1.0, 1.0, 1.0, 1.0]
    same = trainer._generate_and_score_completions(group_inputs(trainer))
    assert torch.count_nonzero(same["advantages"]) == 0


def test_unselected_dreams_are_masked_out_of_the_group(tmp_path, tiny_tokenizer, dataset, fixed_rewards, caplog):
    trainer = make_trainer(
        tmp_path,
        tiny_tokenizer,
        dataset,
        policy_update="grpo",
        num_selected_dreams=2,
        num_random_dreams=0,
        rehearsal_coef=0.0,
        importance_target="context",
    )
    fixed_rewards["rewards"] = [1.0, 0.0]
    with caplog.at_level(logging.WARNING):
        batch = trainer._generate_and_score_completions(group_inputs(trainer))
    # Masking unselected dreams is intended: GRPOTrainer's "all rewards None" warning is not shown for them.
    assert not any("All reward functions returned None" in r.getMessage() for r in caplog.records)
    rewards = trainer._dream_batch["rewards"]
    selected = [i for i, x in enumerate(rewards) if x is not None]
    assert len(selected) == 2
    adv = batch["advantages"]
    # Only the two evaluated dreams form the group: +-1/sqrt(2)-ish; the others get exactly 0.
    expected = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert adv[selected].tolist() == pytest.approx([expected, -expected], rel=1e-5)
    assert all(adv[i] == 0 for i in range(M) if i not in selected)


@pytest.mark.parametrize("lora_policy", [False, True], ids=["full", "peft"])
def test_dream_reward_never_touches_the_policy(tmp_path, tiny_tokenizer, dataset, lora_policy):
    """The real reward (importance, selection, inner LoRA loop, tau) leaves every policy tensor bit-identical, for a
    fully trained policy and for a policy trained through its own LoRA adapter."""
    extra = {}
    if lora_policy:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = make_trainer(tmp_path, tiny_tokenizer, dataset, num_selected_dreams=1, num_random_dreams=1, **extra)
    model = trainer.model
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [n for n, _ in model.named_modules()]
    batch = trainer._generate_and_score_completions(group_inputs(trainer, 1))
    assert [n for n, _ in model.named_modules()] == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.training
    rewards = trainer._dream_batch["rewards"]
    assert sum(r is not None for r in rewards) == 2  # k=1 + b=1 of m=4 evaluated
    assert all(r in (0.0, 1.0) for r in rewards if r is not None)
    assert batch["advantages"].shape == (M,)
    # The policy update then reaches only the parameters that should learn (all of them, or the policy's LoRA).
    batch["advantages"] = torch.ones(M)  # as if every dream had been kept, so the loss has a gradient
    batch["rehearsal_weight"] = torch.ones(M)
    batch["sft_num_tokens"] = batch["completion_mask"].sum()
    batch["rehearsal_num_tokens"] = batch["rehearsal_attention_mask"][:, 1:].sum()
    trainer.compute_loss(model, batch).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and torch.count_nonzero(p.grad) > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    if lora_policy:
        assert all(".lora_" in n and ".default." in n for n in with_grad)


def test_dataset_and_config_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="no 'context' column"):
        rows = [{"passage": "x", "questions": ["q"], "answers": ["a"]}]
        make_trainer(tmp_path, tiny_tokenizer, Dataset.from_list(rows))
    with pytest.raises(ValueError, match=r"needs the columns \['answers'\]"):
        make_trainer(tmp_path, tiny_tokenizer, Dataset.from_list([{"context": "x", "questions": ["q"]}]))
    with pytest.raises(ValueError, match="Task 0 of the dataset is malformed"):
        make_trainer(
            tmp_path, tiny_tokenizer, Dataset.from_list([{"context": "x", "questions": ["q", "r"], "answers": ["a"]}])
        )
    with pytest.raises(ValueError, match="exceeds the 4 dreams per context"):
        DreamConfig(str(tmp_path), num_dreams=4, num_selected_dreams=3, num_random_dreams=2, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="policy_update"):
        DreamConfig(str(tmp_path), policy_update="ppo", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="use_vllm"):
        DreamConfig(str(tmp_path), random_expert_sampling=True, use_vllm=True, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="continuum memory"):
        make_trainer(tmp_path, tiny_tokenizer, Dataset.from_list(demo_tasks(1)), random_expert_sampling=True)


def test_random_expert_sampling_wraps_generation(tmp_path, tiny_tokenizer, dataset, monkeypatch):
    from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory, find_memory

    model = build_model(tiny_tokenizer, seed=0)
    memory = attach_memory(model, MemoryConfig(levels=[LevelConfig("slow", num_slots=3, rank=8)]))
    memory.expand("slow")
    memory.expand("slow")
    args = DreamConfig(
        str(tmp_path / "out"),
        num_dreams=M,
        per_device_train_batch_size=M,
        max_completion_length=6,
        use_cpu=True,
        bf16=False,
        report_to="none",
        random_expert_sampling=True,
        seed=3,
    )
    trainer = DreamTrainer(model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)
    grpo_generate = GRPOTrainer._generate
    seen = []

    def spy(self, prompts):
        generator = find_memory(self.model).state.generator
        seen.append(None if generator is None else generator.initial_seed())
        return grpo_generate(self, prompts)

    monkeypatch.setattr(GRPOTrainer, "_generate", spy)
    trainer._generate([trainer.train_dataset[0]["prompt"]] * M)
    assert seen == [3]  # generation ran inside the memory's random-expert context, seeded with seed + step
    assert find_memory(trainer.model).state.generator is None  # and the context was left afterwards


def test_train_runs_logs_dream_metrics_and_writes_model_card(tmp_path, tiny_tokenizer, dataset):
    trainer = make_trainer(
        tmp_path,
        tiny_tokenizer,
        dataset,
        num_selected_dreams=1,
        num_random_dreams=1,
        gradient_checkpointing=True,
        num_dreams_to_print=2,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in (
        "dream/selected_fraction",
        "dream/tau_before",
        "dream/tau_after",
        "dream/reward_rate",
        "dream/reward_seconds_per_dream",
        "dream/importance_mean",
        "rewards/dream_reward/mean",
    ):
        assert key in logged, key
    assert logged["dream/selected_fraction"] == 0.5
    trainer.create_model_card(model_name="dreamer")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Language Models Need Sleep" in card and "2606.03979" in card and "dreaming" in card
    assert "[None]" not in card and "a fine-tuned version of a local model" in card
    assert "rest_em/kept_fraction" in logged and 0 <= logged["rest_em/kept_fraction"] <= 1


def test_write_dreams_and_evaluate_dreaming_leave_the_policy_untouched(tmp_path, tiny_tokenizer, dataset):
    trainer = make_trainer(tmp_path, tiny_tokenizer, dataset)
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    dreams = trainer.write_dreams(num_dreams=2, temperature=0.0, batch_size=1)
    assert len(dreams) == len(dataset) and all(len(d) == 2 for d in dreams)
    assert all(d[0] == d[1] for d in dreams)  # greedy: both dreams of a task are the same
    assert trainer.write_dreams(num_dreams=1, temperature=0.0, batch_size=2) == [[d[0]] for d in dreams]
    result = trainer.evaluate_dreaming(num_dreams=1)
    assert set(result) == {"tau", "tau_after_dream", "improved_fraction"}
    assert result["tau"] == pytest.approx(trainer.evaluate_tau())  # tau of the model as it is, unchanged by dreaming
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_evaluate_dreaming_averages_the_inner_loop_outcomes(tmp_path, tiny_tokenizer, dataset, monkeypatch):
    """SEAL's protocol: tau after each dream and the improved fraction are the means of the inner-loop outcomes,
    always with the binary rule (whatever the training reward), one dream per task here."""
    trainer = make_trainer(tmp_path, tiny_tokenizer, dataset, reward_type="improvement")
    seen = {}

    def fake(model, tokenizer, tau, tasks, dreams, tau_before, config=None, progress=False):
        seen["config"] = config
        outcomes = [(1.0, 0.75), (0.0, 0.25)][: len(dreams)] + [(0.0, 0.0)] * max(0, len(dreams) - 2)
        return [DreamEvaluation(r, b, a, 0.0, 0.0, 1) for (r, a), b in zip(outcomes, tau_before, strict=True)]

    monkeypatch.setattr(dream_trainer_module, "evaluate_dreams", fake)
    result = trainer.evaluate_dreaming(num_dreams=1)
    n = len(dataset)
    assert result["tau_after_dream"] == pytest.approx((0.75 + 0.25) / n)
    assert result["improved_fraction"] == pytest.approx(1.0 / n)
    assert seen["config"].reward_type == "binary" and trainer.args.reward_type == "improvement"


def test_fewer_contexts_than_one_batch_still_dream_every_step(tmp_path, tiny_tokenizer):
    """One context for a batch of 2 contexts x M dreams: repeated to fill the batch, so the trainer runs its steps
    (TRL's sampler alone serves no partial batch: zero steps)."""
    with pytest.warns(UserWarning, match="fewer than one generation batch"):
        trainer = make_trainer(tmp_path, tiny_tokenizer, Dataset.from_list(demo_tasks(1)),
                               per_device_train_batch_size=2 * M)
    assert len(trainer.train_dataset) == 2
    calls = []
    real_tau = trainer.tau
    trainer.tau = lambda *a: calls.append(1) or real_tau(*a)
    trainer.evaluate_tau()
    assert len(calls) == 1  # tau is measured on each task once, not on the repeats
    trainer.tau = real_tau
    trainer.train()
    assert trainer.state.global_step == 1
