"""Job `seed`: one Knowledge Seeding run (GeneralizedDistillationTrainer), TRL-script style.

    sleep-trl recipes/seed_tiny.yaml
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m sleep_trl recipes/seed_tiny.yaml

Fields: TRL's `ScriptArguments` (dataset_name, dataset_train_split, ...), `GeneralizedDistillationConfig` (every
trainer field) and TRL's `ModelConfig` (model_name_or_path, dtype, use_peft, lora_*).
`dataset_name` may be `world` (the embedded fictional-knowledge world: prompts are its questions, the teacher
prompt holds the documents in context), a local json/jsonl/csv/parquet file, a `save_to_disk` folder, or a Hub id.
"""

from __future__ import annotations

from datasets import Dataset
from trl import ModelConfig, ScriptArguments, get_peft_config

from ..assets import resolve_model_path
from ..data.loading import load_named_dataset
from ..data.sessions import world_stream
from ..trainers.generalized_distillation_config import GeneralizedDistillationConfig
from ..trainers.generalized_distillation_trainer import GeneralizedDistillationTrainer

ARGUMENT_CLASSES = (ScriptArguments, GeneralizedDistillationConfig, ModelConfig)


def world_seeding_dataset(seed: int):
    """Every session's training questions and probes of the embedded world, as conversational prompts; the teacher
    sees the entity's document first (context distillation)."""
    rows = []
    for session in world_stream(seed=seed).sessions:
        for item in [*session.train_qa, *session.probes]:
            question = item["question"]
            rows.append({
                "prompt": [{"role": "user", "content": question}],
                "teacher_prompt": [{"role": "user", "content": f"{item['context']}\n\n{question}"}],
            })
    return Dataset.from_list(rows)


def load_train_dataset(script_args: ScriptArguments, seed: int):
    if script_args.dataset_name in (None, "world"):
        return world_seeding_dataset(seed)
    return load_named_dataset(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)


def run(script_args: ScriptArguments, training_args: GeneralizedDistillationConfig, model_args: ModelConfig):
    if model_args.model_name_or_path is None:
        raise ValueError("Set `model_name_or_path` (the student) in the recipe or with --model_name_or_path.")
    init_kwargs = dict(revision=model_args.model_revision, dtype=model_args.dtype,
                       attn_implementation=model_args.attn_implementation)
    init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = {k: v for k, v in init_kwargs.items() if v is not None}
    if training_args.teacher_model_name_or_path is not None:
        training_args.teacher_model_name_or_path = resolve_model_path(training_args.teacher_model_name_or_path)
    if training_args.teachers:
        training_args.teachers = [resolve_model_path(t) for t in training_args.teachers]

    train_dataset = load_train_dataset(script_args, training_args.seed)
    trainer = GeneralizedDistillationTrainer(
        model=resolve_model_path(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Knowledge Seeding done; model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer
