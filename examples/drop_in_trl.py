"""GeneralizedDistillationTrainer exactly where a TRL user has DistillationTrainer: a TrlParser script.

TRL's own distillation script, with two lines changed (the import and the config class). Everything else a TRL user
knows still works: `--config recipe.yaml`, `accelerate launch`, `--use_peft`, `--use_vllm`, `--push_to_hub`.

    # offline, on a CPU, with two tiny local models and a local prompt file:
    python examples/drop_in_trl.py --model_name_or_path tiny:qwen2:hidden_size=128,num_attention_heads=4 \
        --teacher_model_name_or_path tiny:qwen2 --dataset_name examples/data/prompts.jsonl \
        --output_dir outputs/drop-in --max_steps 4 --use_cpu --bf16 false --max_completion_length 16 --gamma 0

    # the same objective as TRL's DistillationTrainer (pure on-policy, no imitation term):
    python examples/drop_in_trl.py ... --lmbda 1.0 --alpha 1.0

    # any real pair sharing a tokenizer, e.g. upward from a 0.5B teacher into a 1.5B student, on 8 GPUs:
    accelerate launch --config_file recipes/accelerate/zero3.yaml examples/drop_in_trl.py \
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --teacher_model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/tldr --output_dir qwen-1.5b-seeded --use_vllm
"""

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config  # noqa: I001

from sleep_trl import GeneralizedDistillationConfig, GeneralizedDistillationTrainer  # was: DistillationConfig/Trainer
from sleep_trl.assets import resolve_model_path
from sleep_trl.data.loading import load_named_dataset


def main(script_args, training_args, model_args):
    dataset = load_named_dataset(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    trainer = GeneralizedDistillationTrainer(
        model=resolve_model_path(model_args.model_name_or_path),
        teacher_model=resolve_model_path(training_args.teacher_model_name_or_path),
        args=training_args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, GeneralizedDistillationConfig, ModelConfig))
    main(*parser.parse_args_and_config())
