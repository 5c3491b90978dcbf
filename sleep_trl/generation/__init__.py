"""Generation back-ends shared by the trainers.

`sleep_trl.generation.vllm_cpu`: TRL's colocate vLLM engine with a weight sync that also works on vLLM's CPU backend,
loading of arbitrary (teacher) weights into an engine, and a frozen `TeacherEngine` for a separate teacher checkpoint.
"""
