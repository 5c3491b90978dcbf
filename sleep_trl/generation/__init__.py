"""Generation back-ends shared by the evaluation, tau, dreaming and the trainers.

- `sleep_trl.generation.hf`: batched, length-sorted, left-padded transformers `generate` (greedy answers, teacher
  samples, dreams), the one path every non-vLLM generation outside TRL's own loops goes through.
- `sleep_trl.generation.vllm_cpu`: TRL's colocate vLLM engine with a weight sync that also works on vLLM's CPU
  backend, loading of arbitrary (teacher) weights into an engine, and a frozen `TeacherEngine` for a separate
  teacher checkpoint.
"""
