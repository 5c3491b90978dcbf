"""DreamTrainer: Dreaming, the second stage of sleep, on TRL's stable `GRPOTrainer` (paper notes §4).

For each task (a context C plus the data of a downstream score tau) the model writes m dreams from C, the dreams are
scored by a cheap gradient-based importance and the top-k plus b random are kept, each kept dream is rewarded by
fine-tuning an isolated LoRA copy of the model on it and checking whether tau improves, and the dream writer learns
from the rewards, by ReST-EM (the paper) or GRPO. This generalises SEAL's self-edits (Zweiger et al., 2025), where the
self-edit is one kind of dream and tau the no-context QA accuracy.

What GRPOTrainer provides and is reused as is: dataset repetition into groups of m, generation (transformers or
vLLM, `use_vllm=True`), the generation buffer across gradient-accumulation steps, GRPO's group-normalised advantages
and clipped loss, metric logging, checkpoints and model cards. What this class adds, through small overrides:

- `dream_reward` is the (single) reward function: importance, selection, the isolated inner loop, metrics. Dreams
  that are not selected return `None`, which GRPOTrainer turns into NaN: they are left out of the group baseline and
  get a zero advantage (a dream that was never evaluated is neither punished nor rewarded).
- `_generate_and_score_completions` (after the stock one) sets ReST-EM's "advantages" (1 for a kept dream, 0
  otherwise) and adds the tokenised rehearsal rows.
- `_compute_loss`: GRPO's stock loss, or ReST-EM's SFT loss on the kept dreams; plus the rehearsal term.
- `_generate` runs the stock generation inside the continuum memory's random-expert context when asked.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import ClassVar

import torch
from datasets import Dataset, IterableDataset
from rich.console import Console
from rich.progress import track
from rich.table import Table
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, ProcessorMixin
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id

from ..dreaming.experts import random_expert_sampling
from ..dreaming.inner_loop import evaluate_dreams
from ..dreaming.selection import dream_importance, resolve_importance_parameters, select_dreams
from ..dreaming.sft_data import encode_example
from ..dreaming.tau import build_tau
from ..dreaming.templates import build_dream_prompt, completion_text, split_dream
from ..generation.distributed import gathered_whole
from ..generation.hf import encode_prompts, generate_ids, pad_token_id
from ..generation.vllm_cpu import without_trl_engine
from ..memory import find_memory
from ..paper import SLEEP_PAPER
from .batching import fill_one_batch
from .dream_config import DreamConfig
from .model_card import NamedBaseModelCardMixin
from .vllm_engine import setup_colocate_engine

# Keyword arguments GRPOTrainer passes to reward functions that are not dataset columns.
_NON_TASK_KWARGS = {"trainer_state", "log_extra", "log_metric", "environments", "completion_ids", "prompts"}


def prepare_dream_dataset(dataset, args: DreamConfig, tau, conversational: bool):
    """Check a task dataset before any model work, and add the dream `prompt` column when it has none.

    Raises a `ValueError` naming the missing column (the context column, or the columns tau needs) or the bad row.
    """
    if dataset is None:
        return None
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"Expected a `datasets.Dataset` of tasks, got {type(dataset).__name__}.")
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError("The dataset of tasks is empty: there is nothing to dream about. Give it at least one task.")
    columns = dataset.column_names or []
    if columns and args.context_column not in columns:
        raise ValueError(
            f"The dataset has no {args.context_column!r} column (columns: {columns}). Each row is a task: its context "
            "(passage or demonstrations) plus tau's data. Add the column or set `context_column`."
        )
    missing = [c for c in getattr(tau, "required_columns", ()) if columns and c not in columns]
    if missing:
        raise ValueError(
            f"tau ({type(tau).__name__}) needs the columns {missing}, which the dataset lacks (columns: {columns})."
        )
    if isinstance(dataset, Dataset) and hasattr(tau, "queries"):
        for row_index, row in enumerate(dataset):
            try:
                tau.queries(row)
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"Task {row_index} of the dataset is malformed for tau: {err}") from err
    if "prompt" not in columns:

        def add_prompt(row):
            if row.get("prompt") is not None:  # streaming datasets may not list their columns
                return {"prompt": row["prompt"]}
            return {
                "prompt": build_dream_prompt(
                    args.dream_template, row[args.context_column], args.dream_system_prompt, conversational
                )
            }

        dataset = dataset.map(add_prompt)
    return dataset


class DreamTrainer(NamedBaseModelCardMixin, GRPOTrainer):
    """Dreaming (Sleep, stage 2): learn to write the synthetic data that helps the model most.

    Args:
        model: model id/path, `PreTrainedModel` or `PeftModel` (the dream writer, and the base of the isolated copies).
        args: a [`DreamConfig`].
        train_dataset: tasks; each row has the context column (`context` by default) and tau's data (`questions` /
            `answers` for the `qa` tau, `demos` for `demos`). A `prompt` column, if present, is used as the dream
            request as is; otherwise it is built from `dream_template`.
        eval_dataset: tasks for evaluation (evaluation runs the full reward, inner loop included).
        processing_class: the tokenizer (left padding); loaded from the model when `None`.
        tau: a callable `(model, tokenizer, task) -> float` replacing the tau described by the config.
        callbacks, optimizers, peft_config: as in `GRPOTrainer` (`peft_config` trains the dream writer through an
            adapter; the inner loop then stacks its own isolated adapter on top of it).

    Example:

    ```python
    from datasets import Dataset
    from sleep_trl.dreaming.passages import demo_tasks
    from sleep_trl.trainers.dream_config import DreamConfig
    from sleep_trl.trainers.dream_trainer import DreamTrainer

    args = DreamConfig("out", num_dreams=4, num_selected_dreams=1, num_random_dreams=1, tau_metric="contains",
                       per_device_train_batch_size=4, max_steps=4, use_cpu=True, bf16=False)
    trainer = DreamTrainer("path/to/model", args=args, train_dataset=Dataset.from_list(demo_tasks()))
    trainer.train()
    ```
    """

    _tag_names: ClassVar[list[str]] = ["trl", "sleep-trl", "dreaming"]
    _name = "Dream"
    _paper = SLEEP_PAPER

    def __init__(
        self,
        model,
        args: DreamConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        tau: Callable | None = None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DreamConfig(f"{str(name).rstrip('/').split('/')[-1]}-Dream")
        if not isinstance(args, DreamConfig):
            raise TypeError(f"DreamTrainer needs a DreamConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("DreamTrainer needs a `train_dataset` of tasks (context + tau's data).")
        self._check_backend(args)
        self.tau = tau if tau is not None else build_tau(args)
        if not callable(self.tau):
            raise TypeError(
                f"`tau` must be a callable (model, tokenizer, task) -> float, got {type(self.tau).__name__}."
            )

        if processing_class is None:
            model_id = model if isinstance(model, str) else get_config_model_id(model.config)
            processing_class = AutoTokenizer.from_pretrained(model_id, padding_side="left", truncation_side="left")
        tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
        conversational = getattr(tokenizer, "chat_template", None) is not None
        train_dataset = prepare_dream_dataset(train_dataset, args, self.tau, conversational)
        self._tasks = train_dataset  # each task once: what tau is measured on (the training set may repeat them)
        train_dataset = fill_one_batch(train_dataset, args.generation_batch_size // args.num_generations)
        eval_dataset = prepare_dream_dataset(eval_dataset, args, self.tau, conversational)
        if args.random_expert_sampling and not isinstance(model, str):
            self._check_memory(model)

        self._dream_batch: dict | None = None
        self._dream_records: deque = deque(maxlen=max(4 * args.num_dreams_to_print, 1))
        self._selection_step: tuple[int, str] | None = None
        self._selection_calls = 0
        # On vLLM's CPU backend sleep-trl builds the colocate engine itself (TRL's cannot sync weights there), as
        # GeneralizedDistillationTrainer does: `vllm_engine.setup_colocate_engine`.
        with without_trl_engine(args) as deferred_engine:
            super().__init__(
                model=model,
                reward_funcs=[self.dream_reward],
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
            )
        if deferred_engine or (self.use_vllm and args.vllm_mode == "colocate"):
            setup_colocate_engine(self, deferred_engine)
        if args.random_expert_sampling:
            self._check_memory(self.accelerator.unwrap_model(self.model))
        self._importance_params = None
        if args.num_selected_dreams is not None:
            # Resolved now so that a pattern matching nothing fails before training starts.
            self._importance_params = resolve_importance_parameters(
                self.accelerator.unwrap_model(self.model), args.importance_parameters
            )

    # ---- checks ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_backend(args: DreamConfig) -> None:
        if getattr(args, "fsdp", None):
            raise NotImplementedError(
                "DreamTrainer does not support FSDP: the importance gradients and the isolated inner LoRA need the "
                "full weights of the layers they read. Use DeepSpeed ZeRO-3 (recipes/accelerate/zero3.yaml), DDP or a "
                "single process."
            )

    @contextmanager
    def _full_policy(self):
        """The policy as the dream reward reads it: the unwrapped model, with its full weights on every process.

        Under DeepSpeed ZeRO-3 the parameters are gathered whole for the block and every ZeRO hook is lifted
        (`generation.distributed.gathered_whole`, as TRL's `unwrap_model_for_generation` does for generation, also
        for the hooks earlier engines left on a model trained phase after phase): importance gradients, tau's answers
        and each dream's isolated inner LoRA then run on ordinary tensors, every process on its own dreams, with no
        collective call that would need the processes in step. The price is the gathered copy of the weights during
        the reward, as with `ds3_gather_for_generation`."""
        with gathered_whole(self.accelerator.unwrap_model(self.model)) as policy:
            yield policy

    @staticmethod
    def _check_memory(model) -> None:
        if find_memory(model) is None:
            raise ValueError(
                "random_expert_sampling=True needs a model that carries a continuum memory (sleep_trl.memory), but "
                "none was found. Expand the model with a memory first, or set random_expert_sampling=False."
            )

    # ---- generation --------------------------------------------------------------------------------------------------
    def _generate(self, prompts: list):
        """Stock generation; with `random_expert_sampling`, inside the memory's random-expert context (seeded by the
        step so runs are reproducible)."""
        model = self.accelerator.unwrap_model(self.model)
        seed = self.args.seed + self.state.global_step
        with random_expert_sampling(model, self.args.random_expert_sampling, seed=seed):
            return super()._generate(prompts)

    # ---- reward ------------------------------------------------------------------------------------------------------
    def _importance_target(self, tokenizer, task: Mapping) -> list[tuple[str, str]]:
        if self.args.importance_target == "tau_data" and hasattr(self.tau, "sft_examples"):
            return self.tau.sft_examples(tokenizer, task)
        return [("", task[self.args.context_column])]

    def _selection_generator(self, mode: str) -> torch.Generator:
        """Seeded by (selection_seed, global step, call within the step, mode): the same on every process, and the
        same after resuming from a checkpoint (saved at step boundaries) as in an uninterrupted run."""
        step = self.state.global_step
        if self._selection_step != (step, mode):
            self._selection_step, self._selection_calls = (step, mode), 0
        base = self.args.selection_seed if self.args.selection_seed is not None else self.args.seed
        seed = ((base * 1_000_003 + step) * 1009 + self._selection_calls) * 2 + (mode == "eval")
        self._selection_calls += 1
        return torch.Generator().manual_seed(seed % (2**63))

    def dream_reward(self, prompts, completions, **kwargs) -> list[float | None]:
        """The reward of each dream of the (local) generation batch; `None` for dreams not selected.

        Steps: split each dream into training sequences; if selecting, score every dream's importance per task and
        gather the scores from all processes, so that top-k + b random is chosen over each full group of m (seeded,
        identical on every process); measure tau of the model as it is once per task; run the isolated inner loop on
        each kept dream of this process; log metrics and the dream table.
        """
        mode = "train" if self.model.training else "eval"
        m = self.num_generations if mode == "train" else self.num_generations_eval
        texts = [completion_text(c) for c in completions]
        n = len(texts)
        tasks = [{k: v[i] for k, v in kwargs.items() if k not in _NON_TASK_KWARGS} for i in range(n)]
        offset = self.accelerator.process_index * n
        groups = [(offset + i) // m for i in range(n)]
        members: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            members[g].append(i)
        sequences = [split_dream(t, self.args.dream_split) for t in texts]
        with self._full_policy() as policy:
            return self._reward_dreams(policy, texts, tasks, groups, members, sequences, offset, m, mode)

    def _reward_dreams(self, policy, texts, tasks, groups, members, sequences, offset, m, mode):
        n = len(texts)
        t0 = time.perf_counter()
        scores, selected, selecting = self._select_dreams(policy, tasks, sequences, members, offset, m, mode)
        selection_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        tau_before = {
            g: float(self.tau(policy, self._tokenizer, tasks[idx[0]]))
            for g, idx in members.items()
            if any(selected[i] for i in idx)
        }
        tau_seconds = time.perf_counter() - t1
        kept = [i for i in range(n) if selected[i]]
        evaluations = evaluate_dreams(
            policy, self._tokenizer, self.tau, [tasks[i] for i in kept], [sequences[i] for i in kept],
            [tau_before[groups[i]] for i in kept], self.args.inner_loop(),
        )
        rewards: list[float | None] = [None] * n
        after: list[float] = [math.nan] * n
        for i, ev in zip(kept, evaluations, strict=True):
            rewards[i], after[i] = ev.reward, ev.tau_after

        self._log_dream_metrics(
            scores, selected, rewards, after, tau_before, evaluations, sequences, selection_seconds, tau_seconds,
            selecting,
        )
        self._log_completion_extra("importance", scores)
        self._log_completion_extra("selected", selected)
        self._log_completion_extra("tau_after", after)
        context = self.args.context_column
        for i in range(n):
            self._dream_records.append({
                "context": str(tasks[i].get(context, "")), "dream": texts[i], "importance": scores[i],
                "selected": selected[i], "tau_before": tau_before.get(groups[i], math.nan), "tau_after": after[i],
                "reward": rewards[i],
            })
        self._dream_batch = {"texts": texts, "rewards": rewards}
        return rewards

    def _select_dreams(self, policy, tasks, sequences, members, offset: int, m: int, mode: str):
        """Importance scores and the kept mask of this process's dreams (top-k + b random over each full group of m,
        chosen from the scores gathered from every process, with a generator identical on all of them)."""
        args = self.args
        n = len(sequences)
        k, b = args.num_selected_dreams, args.num_random_dreams
        if k is None or k + b >= m:
            return [math.nan] * n, [True] * n, False
        scores = [math.nan] * n
        for idx in members.values():
            target = self._importance_target(self._tokenizer, tasks[idx[0]])
            group_scores = dream_importance(
                policy, self._tokenizer, [sequences[i] for i in idx], target, self._importance_params,
                args.importance_score, args.max_dream_tokens,
            )
            for i, score in zip(idx, group_scores, strict=True):
                scores[i] = score
        local = torch.tensor(scores, dtype=torch.float32, device=self.accelerator.device)
        all_scores = self.accelerator.gather(local).cpu()
        keep = select_dreams(all_scores.view(-1, m), k, b, self._selection_generator(mode)).view(-1)
        return scores, keep[offset : offset + n].tolist(), True

    def _log_dream_metrics(
        self, scores, selected, rewards, after, tau_before, evaluations, sequences, selection_seconds, tau_seconds,
        selecting,
    ) -> None:
        log = self._log_metric
        evaluated = [r for r in rewards if r is not None]
        n = len(rewards)
        log("dream/selected_fraction", sum(selected) / n)
        log("dream/empty_fraction", sum(1 for s in sequences if not s) / n)
        if selecting:
            valid = [s for s in scores if not math.isnan(s)]
            chosen = [s for s, sel in zip(scores, selected, strict=True) if sel and not math.isnan(s)]
            if valid:
                log("dream/importance_mean", sum(valid) / len(valid))
            if chosen:
                log("dream/importance_selected_mean", sum(chosen) / len(chosen))
            log("dream/selection_seconds", selection_seconds)
        if tau_before:
            log("dream/tau_before", sum(tau_before.values()) / len(tau_before))
            log("dream/tau_seconds", tau_seconds)
        if evaluated:
            done = [a for a in after if not math.isnan(a)]
            log("dream/reward_rate", sum(1 for r in evaluated if r > self.args.improvement_threshold) / len(evaluated))
            log("dream/tau_after", sum(done) / len(done))
            gains = [ev.tau_after - ev.tau_before for ev in evaluations]
            log("dream/tau_gain", sum(gains) / len(gains))
            trained = [ev for ev in evaluations if ev.num_tokens > 0]
            if trained:
                log("dream/reward_seconds_per_dream", sum(ev.seconds for ev in trained) / len(trained))
                log("dream/inner_train_seconds_per_dream", sum(ev.train_seconds for ev in trained) / len(trained))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # GRPOTrainer warns about every completion all of whose rewards are None; for dreams that were not selected
        # that is the intended masking, so the warning is silenced here (only around this trainer's own call).
        with _drop_log_records("trl.trainer.grpo_trainer", "All reward functions returned None"):
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    # ---- batch preparation and loss ------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._dream_batch = None
        output = super()._generate_and_score_completions(inputs)
        batch = self._dream_batch
        if batch is None:  # the reward function did not run (cannot happen with the dream reward)
            raise RuntimeError("DreamTrainer's dream reward did not run for this batch.")
        device = self.accelerator.device
        rewards = torch.tensor([math.nan if r is None else r for r in batch["rewards"]], device=device)
        keep = (rewards > self.args.improvement_threshold).float()  # NaN (not selected) compares False
        if self.args.policy_update == "rest_em":
            output["advantages"] = keep
            mask = output["completion_mask"]
            if "tool_mask" in output:
                mask = mask * output["tool_mask"]
            output["sft_num_tokens"] = self.accelerator.gather((mask * keep[:, None]).sum()).sum()
            # The completions table logs GRPO's advantages; show ReST-EM's instead.
            shown = self.accelerator.gather(keep).tolist()
            mode = "train" if self.model.training else "eval"
            # Over the whole generation batch of every process (each process only holds its own share).
            self._metrics[mode]["rest_em/kept_fraction"].append(sum(shown) / len(shown))
            logged = self._logs["advantages"]
            for j, value in enumerate(shown):
                logged[len(logged) - len(shown) + j] = value
        if self.args.rehearsal_coef > 0:
            rows = [encode_example(self._tokenizer, "", t, self.args.max_dream_tokens) for t in batch["texts"]]
            width = max(len(ids) for ids, _ in rows)
            pad = pad_token_id(self._tokenizer)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (row_ids, _) in enumerate(rows):
                ids[r, : len(row_ids)] = torch.tensor(row_ids)
                attention[r, : len(row_ids)] = 1
            output["rehearsal_input_ids"] = ids.to(device)
            output["rehearsal_attention_mask"] = attention.to(device)
            output["rehearsal_weight"] = keep
            counted = (attention[:, 1:].to(device) * keep[:, None]).sum()
            output["rehearsal_num_tokens"] = self.accelerator.gather(counted).sum()
        return output

    def _token_normalizer(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Like GRPO's `dapo` normaliser: the token count of the whole generation batch, rescaled to one micro-batch,
        so that one optimizer step over a generation batch gives the token-mean over that batch."""
        normalizer = num_tokens.clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _rest_em_loss(self, model, inputs) -> torch.Tensor:
        """ReST-EM's M-step: SFT on the kept dreams. The loss is the summed NLL of the kept dreams' completion tokens
        (under the policy, at temperature 1) divided by `_token_normalizer`, so its gradient over a generation batch
        equals the gradient of the token-mean SFT loss on exactly the kept dreams; other dreams contribute zero."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        weight = mask * inputs["advantages"][:, None]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        with self.accelerator.autocast():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=completion_ids.size(1) + 1
            ).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), completion_ids.reshape(-1), reduction="none"
        ).view_as(completion_ids)
        loss = (nll * weight).sum() / self._token_normalizer(inputs["sft_num_tokens"])
        mode = "train" if self.model.training else "eval"
        # The logged NLL is the token mean over the kept dreams of every process (one all-gather per micro-batch,
        # which every process runs, so it cannot leave one waiting).
        nll_sum, tokens = self.accelerator.gather(torch.stack([(nll * weight).sum(), weight.sum()])[None]).detach().sum(0)
        if tokens > 0:
            self._metrics[mode]["rest_em/sft_nll"].append((nll_sum / tokens).item())
        return loss

    def _rehearsal_loss(self, model, inputs) -> torch.Tensor:
        """Rehearsal: the kept dreams' own text as plain language-modelling data (what the isolated copy learned),
        token-averaged over the generation batch like `_rest_em_loss`."""
        weight = inputs["rehearsal_weight"]
        # Skipped only when no process kept a dream (the count is over every process): under ZeRO-3 each forward
        # gathers the weights collectively, so a process whose own dreams were all dropped still runs it.
        if inputs["rehearsal_num_tokens"] == 0:
            return torch.zeros((), device=weight.device)
        ids, attention = inputs["rehearsal_input_ids"], inputs["rehearsal_attention_mask"]
        with self.accelerator.autocast():
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.size(0), -1)
        token_weight = attention[:, 1:] * weight[:, None]
        mode = "train" if self.model.training else "eval"
        if token_weight.sum() > 0:
            self._metrics[mode]["rehearsal/nll"].append(((nll * token_weight).sum() / token_weight.sum()).item())
        return (nll * token_weight).sum() / self._token_normalizer(inputs["rehearsal_num_tokens"])

    def _compute_loss(self, model, inputs):
        if self.args.policy_update == "grpo":
            loss = super()._compute_loss(model, inputs)
        else:
            loss = self._rest_em_loss(model, inputs)
        if self.args.rehearsal_coef > 0:
            loss = loss + self.args.rehearsal_coef * self._rehearsal_loss(model, inputs)
        return loss

    # ---- logging -----------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.accelerator.is_main_process and self.args.num_dreams_to_print > 0 and self._dream_records:
            # Kept dreams first (rewarded before unrewarded), then the others, most recent first.
            records = list(self._dream_records)[::-1]
            records.sort(key=lambda r: (not r["selected"], -(r["reward"] if r["reward"] is not None else -math.inf)))
            print_dream_table(records[: self.args.num_dreams_to_print], self.state.global_step)
        self._dream_records.clear()
        super().log(logs, start_time)

    # ---- evaluation helpers --------------------------------------------------------------------------------------------
    def evaluate_tau(self, dataset: Dataset | None = None) -> float:
        """Mean tau of the model as it is (no context, no adaptation) over the tasks of `dataset` (default: the
        training tasks, each once)."""
        dataset = self._tasks if dataset is None else dataset
        rows = track(dataset, description="tau of the model, task by task", transient=True,
                     disable=not self.accelerator.is_main_process)
        with self._full_policy() as policy:
            scores = [float(self.tau(policy, self._tokenizer, row)) for row in rows]
        return sum(scores) / len(scores)

    def write_dreams(
        self,
        dataset: Dataset | None = None,
        num_dreams: int = 1,
        temperature: float | None = None,
        batch_size: int = 8,
    ):
        """Dreams the model writes now for each task (transformers generation, `max_completion_length` tokens,
        `batch_size` tasks at a time, through `sleep_trl.generation.hf`).

        `temperature=0` decodes greedily; `None` uses the config's sampling temperature. Returns one list of
        `num_dreams` strings per task.
        """
        dataset = self.train_dataset if dataset is None else dataset
        tok = self._tokenizer
        temperature = self.temperature if temperature is None else temperature
        sampled = temperature > 0
        config = GenerationConfig(
            max_new_tokens=self.max_completion_length,
            do_sample=sampled,
            temperature=temperature if sampled else None,
            top_p=self.top_p if sampled else None,
            top_k=None,
            eos_token_id=self.eos_token_ids,
            num_return_sequences=num_dreams if sampled else 1,
        )
        rows = list(dataset)
        chat = [isinstance(row["prompt"], list) for row in rows]
        texts = [
            tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs)
            if is_chat else row["prompt"]
            for row, is_chat in zip(rows, chat, strict=True)
        ]
        # A chat template writes its own special tokens; plain prompts get the tokenizer's.
        ids = [encode_prompts(tok, [t], add_special_tokens=not c)[0] for t, c in zip(texts, chat, strict=True)]
        with self._full_policy() as policy:
            completions = generate_ids(
                policy, ids, pad_id=pad_token_id(tok), batch_size=batch_size, eos_token_ids=self.eos_token_ids,
                generation_config=config,  # whole weights inside `_full_policy`: no process waits
            )
        out = []
        for per_task in completions:
            per_task = per_task if sampled and num_dreams > 1 else [per_task] * (1 if sampled else num_dreams)
            out.append([tok.decode(c, skip_special_tokens=True) for c in per_task])
        return out

    def evaluate_dreaming(
        self, dataset: Dataset | None = None, num_dreams: int = 1, temperature: float | None = 0.0
    ) -> dict[str, float]:
        """SEAL's protocol: for each task the model writes `num_dreams` dreams, an isolated copy is fine-tuned on each
        (the inner loop of the reward), and tau is measured. Returns the mean tau of the model as it is (`tau`), the
        mean tau of the dream-adapted copies (`tau_after_dream`) and the fraction of dreams that improved tau
        (`improved_fraction`). The model is left untouched."""
        dataset = self.train_dataset if dataset is None else dataset
        dreams = self.write_dreams(dataset, num_dreams, temperature)
        with self._full_policy() as policy:
            return self._evaluate_dreams_of(policy, dataset, dreams)

    def _evaluate_dreams_of(self, policy, dataset, dreams) -> dict[str, float]:
        args = self.args
        tasks, seqs, before = [], [], []
        taus = []
        rows = track(list(zip(dataset, dreams, strict=True)), description="tau before each dream", transient=True,
                     disable=not self.accelerator.is_main_process)
        for row, row_dreams in rows:
            tau_now = float(self.tau(policy, self._tokenizer, row))
            taus.append(tau_now)
            for dream in row_dreams:
                tasks.append(row)
                seqs.append(split_dream(dream, args.dream_split))
                before.append(tau_now)
        evaluations = evaluate_dreams(
            policy,
            self._tokenizer,
            self.tau,
            tasks,
            seqs,
            before,
            dataclasses.replace(args.inner_loop(), reward_type="binary"),
            progress=self.accelerator.is_main_process,
        )
        return {
            "tau": sum(taus) / len(taus),
            "tau_after_dream": sum(ev.tau_after for ev in evaluations) / len(evaluations),
            "improved_fraction": sum(ev.reward for ev in evaluations) / len(evaluations),
        }


@contextmanager
def _drop_log_records(logger_name: str, text: str):
    """Within the block, drop the records of `logger_name` whose message contains `text` (accelerate's logger
    prefixes messages with the process rank)."""

    class _Filter(logging.Filter):
        def filter(self, record):
            return text not in record.getMessage()

    target = logging.getLogger(logger_name)
    flt = _Filter()
    target.addFilter(flt)
    try:
        yield
    finally:
        target.removeFilter(flt)


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def print_dream_table(records: list[dict], step: int) -> None:
    """A rich table of sample dreams: context, dream, importance, selected, tau before/after, reward."""
    table = Table(title=f"Dreams at step {step}", show_lines=True, expand=False)
    for name, style in (
        ("context", "dim"),
        ("dream", "bright_white"),
        ("importance", "cyan"),
        ("kept", ""),
        ("τ before", "magenta"),
        ("τ after", "magenta"),
        ("reward", "bold green"),
    ):
        table.add_column(name, style=style, overflow="fold")

    def num(x):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    for r in records:
        table.add_row(
            _short(r["context"], 48),
            _short(r["dream"], 160),
            num(r["importance"]),
            "✓" if r["selected"] else "·",
            num(r["tau_before"]),
            num(r["tau_after"]),
            num(r["reward"]),
        )
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the dream column
        console = Console(width=160)
    console.print(table)
