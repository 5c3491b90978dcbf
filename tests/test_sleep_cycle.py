"""The Sleep cycle on a tiny model: phase order, fast-level reset, baseline mode, resume after a real interruption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sleep_trl.cli import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/sleep_tiny.yaml"
FAST = ["--num_sessions", "2", "--consolidation_args.max_steps", "2", "--wake_args.num_train_epochs", "0.5"]


def tiny_config(output_dir, *extra):
    _, _, (config,) = parse_recipe(RECIPE, ["--output_dir", str(output_dir), *FAST, *extra])
    return config


def run_cycle(config):
    from rich.console import Console

    from sleep_trl.sleep import SleepCycle

    return SleepCycle(config, console=Console(quiet=True)).run()


def memory_tensors(directory):
    return load_file(str(Path(directory) / "memory.safetensors"))


def memory_state(directory):
    return json.loads((Path(directory) / "memory_config.json").read_text())["state"]


def wait_for_phase(proc, ledger, phase, timeout=600):
    """Poll the run's ledger until `phase` is recorded (the run must still be going), so it can be killed there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger.exists() and any(p["phase"] == phase for p in json.loads(ledger.read_text())["phases"]):
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError(f"no {phase} phase recorded in {ledger} within {timeout} s")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cycle") / "run"
    report = run_cycle(tiny_config(out))
    return out, report


def test_phases_run_in_order_at_each_session_boundary(finished_run):
    out, report = finished_run
    order = [(p["session"], p["phase"]) for p in report["phases"]]
    assert order == [(-1, "base"), (0, "wake"), (0, "consolidate"), (0, "eval"),
                     (1, "wake"), (1, "consolidate"), (1, "eval")]
    # every session was evaluated after it was learned, and the zero-shot cells before
    R = report["accuracy_matrix"]["R"]
    assert all(x is not None for row in R for x in row)
    assert [e["session"] for e in report["experts_added"]] == [0, 1]
    for name in ("sleep_report.json", "accuracy_matrix.png", "model/README.md", "model/memory.safetensors"):
        assert (out / name).exists(), name
    assert "Sleep lineage" in (out / "model/README.md").read_text()


def test_fast_level_is_reset_after_consolidation_and_slow_experts_accumulate(finished_run):
    out, _ = finished_run
    for k in range(2):
        after_wake = memory_state(out / f"checkpoints/s{k}-wake")
        after_sleep = memory_state(out / f"checkpoints/s{k}-consolidate")
        assert after_wake["unlocked"] == {"fast": 1, "slow": k}
        assert after_sleep["unlocked"] == {"fast": 0, "slow": k + 1}
        assert after_sleep["suspended"] == []
        tensors = memory_tensors(out / f"checkpoints/s{k}-consolidate")
        woke = memory_tensors(out / f"checkpoints/s{k}-wake")
        fast_down = [key for key in tensors if ".fast.down" in key]
        assert fast_down and all(torch.count_nonzero(tensors[key]) == 0 for key in fast_down)  # pruned
        assert any(torch.count_nonzero(woke[key]) > 0 for key in fast_down)  # the wake did write there
        # the expert consolidated in an earlier session is frozen afterwards
        if k == 1:
            before = memory_tensors(out / "checkpoints/s0-consolidate")
            for key in tensors:
                if ".slow." in key and key.endswith("_0"):
                    assert torch.equal(tensors[key], before[key]), key


def test_wake_and_sleep_read_their_batches_shared_prefix_once_and_learn_the_same(finished_run, tmp_path):
    """`shared_prefix` (the wake) and `consolidation_args.student_shared_prefix` (the sleep's student), both on by
    default, change what the forwards read, not what either phase learns: the losses, the matrix and every
    memory weight at the end (measured: 2e-6 of each tensor's norm apart; the student's tail read 3 positions off its
    prefix moves the slow experts by 1% and leaves the rounded losses as they are)."""
    out, report = finished_run
    off = run_cycle(tiny_config(tmp_path / "off", "--shared_prefix", "false",
                                "--consolidation_args.student_shared_prefix", "false"))

    def phases(r, name):
        return [p["metrics"] for p in r["phases"] if p["phase"] == name]

    for name in ("wake", "consolidate"):
        assert sum(m.get("shared_prefix_batches") or 0 for m in phases(report, name)) > 0, name
        assert all(not m.get("shared_prefix_batches") for m in phases(off, name)), name
        for on_phase, off_phase in zip(phases(report, name), phases(off, name), strict=True):
            assert on_phase["train_loss"] == pytest.approx(off_phase["train_loss"], abs=1e-3), name
    assert report["accuracy_matrix"]["R"] == off["accuracy_matrix"]["R"]
    shared, plain = memory_tensors(out / "model"), memory_tensors(tmp_path / "off/model")
    assert set(shared) == set(plain)
    for key, tensor in plain.items():
        assert (shared[key] - tensor).norm() <= 1e-4 * tensor.norm() + 1e-7, key


def test_eval_awake_reports_what_consolidation_keeps_of_the_awake_accuracy(finished_run, tmp_path):
    """`eval_awake` asks each session after its wake; the report divides the diagonal by it. Training is unchanged."""
    _, report = finished_run
    assert report["consolidation"] is None  # off by default
    awake_run = run_cycle(tiny_config(tmp_path / "awake", "--eval_awake", "true"))
    wakes = [p["metrics"] for p in awake_run["phases"] if p["phase"] == "wake"]
    block = awake_run["consolidation"]
    R = awake_run["accuracy_matrix"]["R"]
    assert block["sessions"] == [0, 1]
    assert block["awake_accuracy"] == [m["awake_accuracy"] for m in wakes]
    assert all(0.0 <= a <= 1.0 for a in block["awake_accuracy"])
    assert block["diagonal"] == [R[0][0], R[1][1]]
    for awake, diag, kept in zip(block["awake_accuracy"], block["diagonal"], block["retention"], strict=True):
        assert kept == (None if awake == 0 else pytest.approx(diag / awake, abs=1e-4))
    assert R == report["accuracy_matrix"]["R"]  # asking questions in between trains nothing differently
    for a, b in zip(wakes, [p["metrics"] for p in report["phases"] if p["phase"] == "wake"], strict=True):
        assert a["train_loss"] == b["train_loss"]


def test_existing_run_with_another_config_is_refused(finished_run):
    from sleep_trl.sleep.ledger import LedgerMismatchError

    out, _ = finished_run
    with pytest.raises(LedgerMismatchError, match="consolidation_args.max_steps"):
        run_cycle(tiny_config(out, "--consolidation_args.max_steps", "3"))


def test_finished_run_is_not_redone(finished_run):
    out, report = finished_run
    stamp = (out / "sleep_report.json").stat().st_mtime_ns
    again = run_cycle(tiny_config(out))
    assert again["accuracy_matrix"]["R"] == report["accuracy_matrix"]["R"]
    assert (out / "sleep_report.json").stat().st_mtime_ns == stamp


def test_sleep_off_is_sequential_finetuning_of_two_experts_with_the_same_budget(tmp_path):
    """`sleep: false` (= `method: sequential`): no sleep, the same fast and slow expert trained every session (two
    experts, as a sleeping session trains), never reset, with the wake's and the consolidation's steps."""
    report = run_cycle(tiny_config(tmp_path / "off", "--sleep", "false"))
    assert report["method"] == "sequential"
    assert [(p["session"], p["phase"]) for p in report["phases"]] == [
        (-1, "base"), (0, "wake"), (0, "eval"), (1, "wake"), (1, "eval")]
    state = memory_state(tmp_path / "off/checkpoints/s1-wake")
    assert state["unlocked"] == {"fast": 1, "slow": 1}
    first = memory_tensors(tmp_path / "off/checkpoints/s0-wake")
    second = memory_tensors(tmp_path / "off/checkpoints/s1-wake")
    changed = {k for k in first if not torch.equal(first[k], second[k])}
    assert changed and all(k.endswith("_0") and (".fast." in k or ".slow." in k) for k in changed)
    wake = [p for p in report["phases"] if p["phase"] == "wake"]
    cfg = report["config"]
    assert all(p["metrics"]["steps"] > cfg["consolidation_args"]["max_steps"] for p in wake)


def test_arms_that_never_sleep_get_the_steps_a_sleep_in_epochs_runs(tmp_path):
    """With `consolidation_args.max_steps: -1` a sleep runs `num_train_epochs` over its prompts, which grow with the
    stream; the replay arm's wake gets exactly the steps the sleeping run's wake and consolidation took together."""
    epochs = ["--consolidation_args.max_steps", "-1", "--consolidation_args.num_train_epochs", "1.5"]
    slept = run_cycle(tiny_config(tmp_path / "sleep", *epochs))
    replayed = run_cycle(tiny_config(tmp_path / "replay", "--method", "replay", *epochs))

    def steps(report, phase):
        return [p["metrics"]["steps"] for p in report["phases"] if p["phase"] == phase]

    sleeps = steps(slept, "consolidate")
    assert sleeps[1] > sleeps[0] > 0  # the second sleep also replays the first session
    assert steps(replayed, "wake") == [w + c for w, c in zip(steps(slept, "wake"), sleeps, strict=True)]


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_result(tmp_path, finished_run):
    """Kill a real run (SIGKILL) right after its first consolidation, start it again: same memory, same answers."""
    reference_dir, reference = finished_run
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sleep_trl", str(RECIPE), "--output_dir", str(out), *FAST]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = out / "cycle_state.json"
    try:
        wait_for_phase(proc, ledger, "consolidate")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    interrupted = json.loads(ledger.read_text())
    assert not interrupted["finished"]
    done_before = [(p["session"], p["phase"]) for p in interrupted["phases"]]
    assert (0, "consolidate") in done_before and (1, "eval") not in done_before

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resuming" in resumed.stdout
    report = json.loads((out / "sleep_report.json").read_text())
    # no finished phase was repeated, none is missing
    assert [(p["session"], p["phase"]) for p in report["phases"]] == [
        (p["session"], p["phase"]) for p in reference["phases"]]
    assert report["accuracy_matrix"]["R"] == reference["accuracy_matrix"]["R"]
    assert report["accuracy_matrix"]["records"] == reference["accuracy_matrix"]["records"]
    a, b = memory_tensors(out / "model"), memory_tensors(reference_dir / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dreaming_runs_after_consolidation_and_trains_only_the_new_expert(tmp_path, monkeypatch):
    """`dream: true` adds a dream phase after each consolidation; it trains the slow expert that sleep unlocked and
    nothing else, and its tau asks and scores exactly as the accuracy matrix does. A random tiny model cannot
    improve tau, so every selected dream is kept (threshold below any reward, a `dream_args` field) to make the
    update non-zero."""
    import sleep_trl.sleep.cycle as cycle

    seen = {}

    class SpyDreamTrainer(cycle.DreamTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["args"], seen["tau"] = self.args, self.tau

    monkeypatch.setattr(cycle, "DreamTrainer", SpyDreamTrainer)
    out = tmp_path / "dream"
    config = tiny_config(out, "--dream", "true", "--dream_args.max_steps", "1", "--dream_args.num_dreams", "2",
                         "--dream_args.num_selected_dreams", "1", "--dream_args.max_completion_length", "12",
                         "--dream_args.inner_steps", "1", "--dream_args.improvement_threshold", "-1")
    report = run_cycle(config)
    assert [(p["session"], p["phase"]) for p in report["phases"]] == [
        (-1, "base"), (0, "wake"), (0, "consolidate"), (0, "dream"), (0, "eval"),
        (1, "wake"), (1, "consolidate"), (1, "dream"), (1, "eval")]
    dream = [p for p in report["phases"] if p["phase"] == "dream"]
    assert all({"tau_before", "tau_after", "reward_rate"} <= set(p["metrics"]) for p in dream)
    args = seen["args"]
    assert (args.num_generations, args.num_selected_dreams, args.improvement_threshold) == (2, 1, -1.0)
    assert args.per_device_train_batch_size == 2  # one context per round: its dreams form the group
    assert args.random_expert_sampling  # the tiny recipe routes its slow level
    qa = seen["tau"].qa  # the cycle's own closed-book QA, with the evaluation's settings
    assert (qa.metric, qa.max_new_tokens, qa.batch_size) == (config.eval_metric, config.eval_max_new_tokens,
                                                              config.eval_batch_size)
    for k in range(2):
        slept = memory_tensors(out / f"checkpoints/s{k}-consolidate")
        dreamt = memory_tensors(out / f"checkpoints/s{k}-dream")
        changed = {key for key in slept if not torch.equal(slept[key], dreamt[key])}
        assert changed, "dreaming trained nothing"
        assert all(".slow." in key and key.endswith(f"_{k}") for key in changed), changed


def test_wake_in_context_consolidates_from_the_documents_without_a_fast_level(tmp_path):
    report = run_cycle(tiny_config(tmp_path / "ctx", "--wake", "context"))
    assert [(p["session"], p["phase"]) for p in report["phases"]] == [
        (-1, "base"), (0, "consolidate"), (0, "eval"), (1, "consolidate"), (1, "eval")]
    state = memory_state(tmp_path / "ctx/checkpoints/s1-consolidate")
    assert state["unlocked"] == {"fast": 0, "slow": 2}
    tensors = memory_tensors(tmp_path / "ctx/checkpoints/s1-consolidate")
    assert all(torch.count_nonzero(v) == 0 for key, v in tensors.items() if ".fast.down" in key)
    assert any(torch.count_nonzero(v) > 0 for key, v in tensors.items() if ".slow.down_1" in key)


def test_a_run_from_before_a_new_field_resumes_when_the_field_keeps_its_default(tmp_path, finished_run):
    import shutil

    from sleep_trl.sleep.ledger import LedgerMismatchError

    out, report = finished_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    ledger = old / "cycle_state.json"
    data = json.loads(ledger.read_text())
    del data["fingerprint"]["dream_args.num_random_dreams"]  # as written by a version without that field
    ledger.write_text(json.dumps(data))
    assert run_cycle(tiny_config(old))["accuracy_matrix"]["R"] == report["accuracy_matrix"]["R"]
    with pytest.raises(LedgerMismatchError, match="dream_args.num_random_dreams"):
        run_cycle(tiny_config(old, "--dream_args.num_random_dreams", "1"))


def test_epochs_that_max_steps_overrides_are_not_part_of_a_runs_identity(tmp_path, finished_run):
    """With `consolidation_args.max_steps > 0` the trainer ignores `num_train_epochs`: a run resumes under a recipe
    that differs only there (the main job's 4 epochs plus `--consolidation_args.max_steps 40` against a run of the
    40-step recipe), also from a ledger an older version wrote with the epochs in it; where the epochs do count
    (`max_steps: -1`) another value is refused."""
    import shutil

    from sleep_trl.sleep.ledger import LedgerMismatchError

    out, report = finished_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    ledger = old / "cycle_state.json"
    data = json.loads(ledger.read_text())
    assert "consolidation_args.num_train_epochs" not in data["fingerprint"]  # FAST sets max_steps 2
    data["fingerprint"]["consolidation_args.num_train_epochs"] = 3.0  # as an older version wrote it
    ledger.write_text(json.dumps(data))
    again = run_cycle(tiny_config(old, "--consolidation_args.num_train_epochs", "7"))
    assert again["accuracy_matrix"]["R"] == report["accuracy_matrix"]["R"]
    with pytest.raises(LedgerMismatchError, match="consolidation_args.max_steps"):
        run_cycle(tiny_config(old, "--consolidation_args.max_steps", "-1", "--consolidation_args.num_train_epochs", "7"))


def test_wake_batches_group_texts_of_similar_length():
    """Each epoch of the wake is every text once; its batches hold texts of similar length (padding ~1.1x instead of
    ~1.5x with random batches of short questions and long documents)."""
    import random

    from sleep_trl.sleep.data import length_grouped_order

    lengths = [52, 55, 49, 60] * 3 + [29, 30, 28, 31] * 12  # 12 documents, 48 question/answer pairs
    order = length_grouped_order(lengths, num_rows=len(lengths) * 2 + 8, batch_size=8, seed=0)
    assert len(order) == 2 * len(lengths) + 8
    for e in range(2):
        assert sorted(order[e * 60 : (e + 1) * 60]) == list(range(60))  # an epoch is a permutation
    assert order[:60] != order[60:120]  # and epochs differ

    def padded(rows):
        return sum(max(lengths[i] for i in rows[b : b + 8]) * len(rows[b : b + 8]) for b in range(0, len(rows), 8))

    grouped = padded(order[:60]) / sum(lengths)
    shuffled = list(range(60))
    random.Random(0).shuffle(shuffled)
    assert grouped < 1.2 and padded(shuffled) / sum(lengths) > grouped + 0.2


def test_the_wake_serves_the_layers_below_the_memory_from_the_frozen_trunk_and_learns_the_same(tmp_path):
    """With the memory in the top layer only, the wake's later epochs take layer 0's output from the cache, and the
    fast expert it learns is the one the full forward learns (to 1e-5); `frozen_trunk: false` runs it in full."""
    runs = {}
    for trunk in ("true", "false"):
        config = tiny_config(tmp_path / trunk, "--num_sessions", "1", "--memory_layers", "1",
                             "--wake_args.num_train_epochs", "3", "--frozen_trunk", trunk)
        runs[trunk] = run_cycle(config)
    wake = {t: next(p for p in r["phases"] if p["phase"] == "wake") for t, r in runs.items()}
    steps, texts = wake["true"]["metrics"]["steps"], wake["true"]["metrics"]["texts"]
    assert wake["true"]["metrics"]["trunk_served_rows"] == steps * 8 - texts  # all but the first sight of each text
    assert "trunk_served_rows" not in wake["false"]["metrics"]
    learnt = {t: memory_tensors(tmp_path / t / "checkpoints/s0-wake") for t in runs}
    assert learnt["true"].keys() == learnt["false"].keys()
    for name, tensor in learnt["false"].items():
        torch.testing.assert_close(learnt["true"][name], tensor, atol=1e-5, rtol=1e-5)


def test_replay_arm_rehearses_earlier_sessions_answered_by_the_model(tmp_path, monkeypatch):
    """`method: replay`: from session 1 on, the wake also learns `replay_prompts` questions of each earlier session
    with the answers the model gave right before the session (or, `replay_source: stored`, the stored ones)."""
    import sleep_trl.sleep.cycle as cycle

    seen = []
    real = cycle.rehearsal_texts
    monkeypatch.setattr(cycle, "rehearsal_texts", lambda c, k, seed: seen.append(real(c, k, seed)) or seen[-1])
    report = run_cycle(tiny_config(tmp_path / "replay", "--method", "replay", "--replay_prompts", "3"))
    wake = [p for p in report["phases"] if p["phase"] == "wake"]
    assert "rehearsal_texts" not in wake[0]["metrics"] and wake[1]["metrics"]["rehearsal_texts"] == 3
    [texts] = seen
    assert len(texts) == 3 and all("<|im_start|>assistant\n" in t for t in texts)
    stored = run_cycle(tiny_config(tmp_path / "stored", "--method", "replay", "--replay_prompts", "3",
                                   "--replay_source", "stored"))
    assert stored["config"]["replay_source"] == "stored"
    # same budget as the sequential arm: the rehearsal adds text, not steps
    assert [p["metrics"]["steps"] for p in wake] == [
        p["metrics"]["steps"] for p in stored["phases"] if p["phase"] == "wake"]


def test_expert_per_session_trains_one_fresh_expert_per_session_and_freezes_the_rest(tmp_path):
    out = tmp_path / "eps"
    report = run_cycle(tiny_config(out, "--method", "expert_per_session"))
    assert [p["phase"] for p in report["phases"]] == ["base", "wake", "eval", "wake", "eval"]
    first, second = memory_tensors(out / "checkpoints/s0-wake"), memory_tensors(out / "checkpoints/s1-wake")
    changed = {k for k in first if not torch.equal(first[k], second[k])}
    assert changed and all(".slow." in k and k.endswith("_1") for k in changed)  # session 1 trained slot 1 only
    assert memory_state(out / "checkpoints/s1-wake")["unlocked"] == {"fast": 0, "slow": 2}
    rank = json.loads((out / "checkpoints/s1-wake/memory_config.json").read_text())["config"]["levels"][1]["rank"]
    assert rank == report["config"]["fast_rank"] + report["config"]["slow_rank"]  # sleep's two experts' worth


def test_dream_only_learns_the_session_plus_dreams_the_model_wrote(tmp_path):
    report = run_cycle(tiny_config(tmp_path / "dreams", "--method", "dream_only", "--dream_args.num_dreams", "2",
                                   "--dream_args.max_completion_length", "6"))
    wake = [p for p in report["phases"] if p["phase"] == "wake"]
    assert all(p["metrics"]["dream_texts"] > 0 for p in wake)
    assert all(p["metrics"]["dream_texts"] <= 2 * p["metrics"]["texts"] for p in wake)


def test_sleep_on_a_squad_file_with_several_reference_answers(tmp_path):
    from test_sleep_data import squad_file

    path = squad_file(tmp_path)
    out = tmp_path / "squad"
    report = run_cycle(tiny_config(out, "--dataset_name", str(path), "--passages_per_session", "2",
                                   "--document_prompts", "1"))
    assert report["data"]["kind"] == "squad" and report["data"]["source"] == str(path)
    assert [s["name"] for s in report["data"]["sessions"]] == ["Article0", "Article1"]
    records = report["accuracy_matrix"]["records"]["0,0"]
    assert records[0]["answers"] == ["answer 000", "alt 000"]
    consolidation = [p for p in report["phases"] if p["phase"] == "consolidate"]
    # documents only: each of the 2 passages is continued from its first sentence (`document_prompts` 1)
    assert consolidation[0]["metrics"]["prompts"] == 2
    # 2 prompts, fewer than one batch of 4, still sleep for every step (TRL's sampler serves no partial batch)
    assert [p["metrics"]["steps"] for p in consolidation] == [2, 2]
    assert "squad.json" in (out / "model/README.md").read_text()


def test_refused_data_leaves_no_run_directory_and_other_data_is_a_different_run(tmp_path, finished_run):
    from sleep_trl.data.sessions import StreamError
    from sleep_trl.sleep.ledger import LedgerMismatchError

    out = tmp_path / "never"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no session column"}) + "\n")
    with pytest.raises(StreamError, match="session"):
        run_cycle(tiny_config(out, "--dataset_name", str(bad)))
    assert not out.exists()
    done, _ = finished_run
    with pytest.raises(LedgerMismatchError, match="data"):
        run_cycle(tiny_config(done, "--facts_per_session", "22"))


def test_warm_start_makes_the_new_slow_expert_a_copy_of_the_fast_one(tmp_path):
    """With `warm_start` (and a learning rate of 0, so distillation changes nothing) the expert a sleep consolidates
    is the fast expert the wake trained, while the fast level is pruned."""
    out = tmp_path / "warm"
    run_cycle(tiny_config(out, "--warm_start", "true", "--consolidation_args.learning_rate", "0"))
    for k in range(2):
        woke = memory_tensors(out / f"checkpoints/s{k}-wake")
        slept = memory_tensors(out / f"checkpoints/s{k}-consolidate")
        fast = {key: v for key, v in woke.items() if ".fast." in key and not key.split(".")[-1].startswith("router")}
        assert fast and any(torch.count_nonzero(v) for v in fast.values())
        for key, value in fast.items():
            assert torch.equal(slept[key.replace(".fast.", ".slow.").replace("_0", f"_{k}")], value), key



def test_without_expansion_every_sleep_trains_the_first_slow_expert_again(tmp_path):
    """`expansion: false` (the ablation): one slow expert for the whole run; session 1's sleep trains only it again,
    taught by the teacher cache filled before the first step (the model before that sleep)."""
    out = tmp_path / "noexp"
    report = run_cycle(tiny_config(out, "--expansion", "false", "--replay_prompts", "4"))
    sleeps = [p for p in report["phases"] if p["phase"] == "consolidate"]
    assert [p["metrics"]["steps"] for p in sleeps] == [2, 2]
    assert memory_state(out / "checkpoints/s1-consolidate")["unlocked"] == {"fast": 0, "slow": 1}
    woke, slept = memory_tensors(out / "checkpoints/s1-wake"), memory_tensors(out / "checkpoints/s1-consolidate")
    changed = {k for k in woke if not torch.equal(woke[k], slept[k])}
    assert any(".slow." in k and k.endswith("down_0") for k in changed)  # the one slow expert learned again
    assert all(".fast." in k or (".slow." in k and k.endswith("_0")) for k in changed)  # nothing else (fast: pruned)
    with pytest.raises(Exception, match="expansion: false.*lmbda"):
        tiny_config(tmp_path / "bad", "--expansion", "false", "--consolidation_args.lmbda", "0.5")


def test_without_expansion_the_teacher_is_the_model_before_the_sleep(monkeypatch, tmp_path, tiny_dir, tiny_tokenizer):
    """`consolidate(..., expand=False)` trains the slow expert that holds the older sessions, so the model before the
    sleep is no view of the student: the teacher's hidden states, cached before the first step, are the pre-sleep
    model's (fast level on for new rows, off for replayed rows), and training does not move them."""
    from datasets import Dataset

    from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory
    from sleep_trl.sleep.consolidation import consolidate, consolidation_fields
    from sleep_trl.trainers.generalized_distillation_trainer import GeneralizedDistillationTrainer

    model_dir = tiny_dir("noexp_teacher", arch="llama", seed=5)

    def before_the_sleep():  # a slow expert that learnt earlier sessions, a fast expert awake with the new one
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        mem = attach_memory(model, MemoryConfig(levels=[LevelConfig("fast", num_slots=1, rank=4, gate="fixed"),
                                                        LevelConfig("slow", num_slots=2, rank=4, gate="fixed")]))
        gen = torch.Generator().manual_seed(0)
        for level in ("slow", "fast"):
            mem.expand(level)
            with torch.no_grad():
                for p in mem.parameters(level, slots=[0]):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        return model.eval(), mem

    trainers = []
    fill = GeneralizedDistillationTrainer._fill_teacher_cache

    def recording_fill(self):
        trainers.append(self)
        fill(self)

    monkeypatch.setattr(GeneralizedDistillationTrainer, "_fill_teacher_cache", recording_fill)
    texts = [f"Tell me about the river number {i}." for i in range(4)]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts],
                              "replay": [False, True, False, True]})
    model, mem = before_the_sleep()
    args = consolidation_fields({"output_dir": str(tmp_path / "sleep"), "use_cpu": True, "max_steps": 3,
                                 "per_device_train_batch_size": 4, "max_completion_length": 6,
                                 "learning_rate": 5e-2, "seed": 0})
    consolidate(model, tiny_tokenizer, data, args, expand=False)
    assert mem.unlocked("slow") == 1 and mem.unlocked("fast") == 0  # no new expert; the fast level pruned
    [trainer] = trainers
    reference, reference_mem = before_the_sleep()
    checked = {False: 0, True: 0}
    for (prompt, _, replay), pool in trainer._teacher_cache.samples.items():
        for sample in pool:
            ids = torch.tensor([list(prompt) + sample.completion])
            mask = torch.ones_like(ids)
            K = len(sample.completion)
            with torch.no_grad():
                if replay:
                    reference_mem.suspend("fast")
                teacher = trainer._get_last_hidden_state(reference, ids, mask, K)[0]
                reference_mem.resume("fast")
                student = trainer._get_last_hidden_state(model, ids, mask, K)[0]  # after the sleep's 3 steps
            torch.testing.assert_close(sample.hidden[0], teacher, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(sample.hidden[0], student, atol=1e-3)  # the student moved; its teacher not
            checked[replay] += 1
    assert checked == {False: 6, True: 6}  # 2 prompts of each kind x 3 samples (the 3 steps cover 3 epochs)


def test_a_sleep_reads_the_teachers_samples_through_the_frozen_trunk_and_learns_the_same(tmp_path, tiny_dir,
                                                                                      tiny_tokenizer):
    """With the memory in the top layer, every distillation row (a prompt and a cached teacher sample, new and
    replayed rows alike) is served from the states recorded while the teacher wrote it: the student never runs
    layer 0 in training, and the new expert ends where the full forward takes it (to 1e-5). The fill samples each
    prompt twice in one call, so the recording also follows the shared prefill's repeated cache."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory
    from sleep_trl.sleep.consolidation import consolidate, consolidation_fields

    model_dir = tiny_dir("trunk_sleep", arch="llama", seed=6)
    texts = [f"Tell me about the river number {i}." for i in range(6)]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts],
                              "replay": [False, True, False, True, False, False]})
    learnt, results = {}, {}
    for trunk in (True, False):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        mem = attach_memory(model, MemoryConfig(layers=[1], levels=[
            LevelConfig("fast", num_slots=1, rank=4, gate="fixed"), LevelConfig("slow", num_slots=2, rank=4)]))
        mem.freeze_all_but(mem.expand("fast"))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in mem.parameters("fast"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        args = consolidation_fields({"output_dir": str(tmp_path / str(trunk)), "use_cpu": True, "max_steps": 3,
                                     "per_device_train_batch_size": 4, "max_completion_length": 6,
                                     "learning_rate": 5e-2, "seed": 0, "logging_steps": 1})
        results[trunk] = consolidate(model, tiny_tokenizer, data, args, frozen_trunk=trunk)
        learnt[trunk] = [p.detach().clone() for p in mem.parameters("slow", slots=[0])]
    assert results[True].trunk_served_rows == 3 * 4  # every training row, none computed again
    assert results[False].trunk_served_rows is None
    for a, b in zip(learnt[False], learnt[True]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_router_loss_acts_from_the_first_sleep_with_replayed_rows(tmp_path):
    """`--consolidation_args.router_loss_weight`: the report shows the router loss of the second sleep (the first
    with replayed rows); the first sleep has nothing to stay quiet on."""
    report = run_cycle(tiny_config(tmp_path / "router", "--replay_prompts", "4",
                                   "--consolidation_args.router_loss_weight", "1.0",
                                   "--consolidation_args.logging_steps", "1"))
    first, second = [p["metrics"] for p in report["phases"] if p["phase"] == "consolidate"]
    assert "router_loss_last" not in first
    assert second["router_loss_last"] > 0


def test_consolidation_block_divides_each_diagonal_cell_by_the_awake_accuracy():
    from types import SimpleNamespace

    from sleep_trl.sleep.ledger import PhaseRecord
    from sleep_trl.sleep.report import consolidation_block

    phases = [PhaseRecord(0, "wake", 1.0, metrics={"awake_accuracy": 0.8}), PhaseRecord(0, "consolidate", 1.0),
              PhaseRecord(1, "wake", 1.0, metrics={"awake_accuracy": 0.0}), PhaseRecord(2, "wake", 1.0)]
    matrix = SimpleNamespace(R=[[0.6, None, None], [0.5, 0.4, None], [0.5, 0.4, 0.3]])
    block = consolidation_block(SimpleNamespace(phases=phases), matrix)
    assert block == {"sessions": [0, 1], "awake_accuracy": [0.8, 0.0], "diagonal": [0.6, 0.4],
                     "retention": [0.75, None]}
    assert consolidation_block(SimpleNamespace(phases=phases[1:2]), matrix) is None


@pytest.mark.parametrize("flags", [["--method", "replay"], ["--wake", "context"]])
def test_eval_awake_without_a_sleeping_fast_wake_is_refused_naming_the_field(tmp_path, flags):
    with pytest.raises(ValueError, match="eval_awake"):
        tiny_config(tmp_path / "run", "--eval_awake", "true", *flags)
