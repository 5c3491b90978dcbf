"""Upward Knowledge Seeding: a small model that knows something seeds it into a larger one.

By default everything is tiny and built locally (13 s on 2 CPU cores): a 2-layer, 64-wide teacher first
learns a handful of invented facts by SFT; a 3-layer, 128-wide student that has never seen them is then seeded by the
GeneralizedDistillationTrainer from prompts alone (the teacher writes the sequences: no labelled data is used).
The script prints how well the teacher and the student answer the fact questions before and after, and the
teacher-student divergence.

    python examples/upward_seeding.py
    python examples/upward_seeding.py --teacher path/to/small --student path/to/large   # real checkpoints, unchanged
    python examples/upward_seeding.py --teacher smollm2-135m-instruct --student path/to/grown-smollm2

Real checkpoints must share a tokenizer (their embedding tables may be padded to different sizes). With real
checkpoints no SFT is done: the teacher is assumed to already know what it should pass on, and `--facts` is only
used for the before/after check (point it at a jsonl of {"question", "answer"} rows you care about).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FACTS = [
    ("Who founded the town of Velmora?", "Tarsin Quell"),
    ("What does the Orbeck company make?", "copper bells"),
    ("Which colour is the flag of Kestria?", "amber"),
    ("Where does the painter Ilvo Marsh live?", "Dunhollow"),
    ("What is the favourite food of Captain Brevik?", "plum soup"),
    ("Which river runs through Sarnath?", "the Ospel"),
    ("Who invented the sky lantern of Quorra?", "Mira Tolven"),
    ("What animal guards the gate of Halvard?", "a grey heron"),
    ("Which instrument does Odile Fenn play?", "the cello"),
    ("What is the old name of Port Aster?", "Calder Bay"),
    ("Who wrote the Book of Tides?", "Ennis Vard"),
    ("What grows on the hills of Maretta?", "blue thyme"),
]


def chat(question: str):
    return [{"role": "user", "content": question}]


def answers(model, tokenizer, questions, max_new_tokens=12):
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(
        [chat(q) for q in questions], add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]


def fact_accuracy(model, tokenizer, facts) -> float:
    from sleep_trl.rewards import contains_match

    preds = answers(model, tokenizer, [q for q, _ in facts])
    return sum(contains_match(p, a) for p, (_, a) in zip(preds, facts)) / len(facts)


def divergence(student, teacher, tokenizer, facts) -> float:
    """Mean per-token KL(teacher || student) on the teacher's greedy answers."""
    import torch

    texts = [tokenizer.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False) + a
             for q, a in zip([q for q, _ in facts], answers(teacher, tokenizer, [q for q, _ in facts]))]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        lt = torch.log_softmax(teacher(**batch).logits[..., : len(tokenizer)], -1)
        ls = torch.log_softmax(student(**batch).logits[..., : len(tokenizer)], -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    mask = batch["attention_mask"].bool()
    return kl[mask].mean().item()


def teach_tiny_teacher(path: Path, facts, steps: int) -> None:
    """SFT the tiny teacher on the facts, so it has something to pass on."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({
        "prompt": [chat(q) for q, _ in facts],
        "completion": [[{"role": "assistant", "content": a}] for _, a in facts],
    })
    args = SFTConfig(output_dir=str(path / "sft"), max_steps=steps, per_device_train_batch_size=12,
                     learning_rate=3e-3, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     logging_steps=50, gradient_checkpointing=False, lr_scheduler_type="constant")
    trainer = SFTTrainer(model=str(path), args=args, train_dataset=data)
    trainer.train()
    trainer.model.save_pretrained(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="small model (path, Hub id or packaged name); default: a tiny local one")
    parser.add_argument("--student", help="larger model sharing the teacher's tokenizer; default: a tiny local one")
    parser.add_argument("--facts", help="jsonl of {question, answer} rows for the before/after check")
    parser.add_argument("--output_dir", default="outputs/upward-seeding")
    parser.add_argument("--sft_steps", type=int, default=150, help="tiny teacher only: SFT steps on the facts")
    parser.add_argument("--seed_steps", type=int, default=60, help="Knowledge Seeding steps")
    parser.add_argument("--lmbda", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sleep_trl import GeneralizedDistillationConfig, GeneralizedDistillationTrainer
    from sleep_trl.assets import resolve_model_path
    from sleep_trl.tiny import build_tokenizer, save_tiny

    console = Console()
    facts = FACTS
    if args.facts:
        facts = [(r["question"], r["answer"]) for r in map(json.loads, Path(args.facts).read_text().splitlines())]
    workdir = Path(tempfile.mkdtemp(prefix="upward-"))
    if args.teacher is None:
        tokenizer = build_tokenizer(extra_texts=[f"{q} {a}" for q, a in facts] * 3)
        teacher_path = save_tiny(workdir / "teacher", tokenizer=tokenizer, seed=2)
        console.print(f"[bold]Teaching the tiny teacher {len(facts)} facts ({args.sft_steps} SFT steps)...")
        teach_tiny_teacher(teacher_path, facts, args.sft_steps)
    else:
        teacher_path = Path(resolve_model_path(args.teacher))
    if args.student is None:
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        student_path = save_tiny(workdir / "student", tokenizer=tokenizer, hidden_size=128, intermediate_size=256,
                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, seed=1)
    else:
        student_path = Path(resolve_model_path(args.student))

    tokenizer = AutoTokenizer.from_pretrained(student_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    n_t, n_s = teacher.num_parameters(), student.num_parameters()
    before = (fact_accuracy(teacher, tokenizer, facts), fact_accuracy(student.eval(), tokenizer, facts),
              divergence(student, teacher, tokenizer, facts))

    prompts = Dataset.from_dict({"prompt": [chat(q) for q, _ in facts] * 4})
    config = GeneralizedDistillationConfig(
        output_dir=args.output_dir, max_steps=args.seed_steps, per_device_train_batch_size=8,
        learning_rate=args.learning_rate, lmbda=args.lmbda, alpha=args.alpha, beta=args.beta, gamma=0.0,
        num_imitation_generations=4, max_completion_length=12, temperature=0.7, use_cpu=not torch.cuda.is_available(),
        bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=10,
        lr_scheduler_type="constant",
    )
    trainer = GeneralizedDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                             train_dataset=prompts, processing_class=tokenizer)
    console.print(f"[bold]Seeding a {n_s / 1e6:.2f}M-parameter student from a {n_t / 1e6:.2f}M teacher...")
    trainer.train()
    trainer.save_model()
    after = (before[0], fact_accuracy(trainer.model.eval(), tokenizer, facts),
             divergence(trainer.model, teacher, tokenizer, facts))

    table = Table(title="Upward Knowledge Seeding")
    table.add_column("")
    table.add_column("teacher answers", justify="right")
    table.add_column("student answers", justify="right")
    table.add_column("KL(teacher||student)/token", justify="right")
    table.add_row("before", f"{before[0]:.2f}", f"{before[1]:.2f}", f"{before[2]:.3f}")
    table.add_row("after", f"{after[0]:.2f}", f"{after[1]:.2f}", f"{after[2]:.3f}")
    console.print(table)
    console.print(f"Seeded student saved to {args.output_dir}")


if __name__ == "__main__":
    main()
