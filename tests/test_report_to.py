"""`report_to` and `run_name` of the sleep job reach every phase's trainer (TensorBoard here: it is installed with
the dev extras), with one run name per phase, and do not change the run's identity."""

from pathlib import Path

from test_sleep_cycle import run_cycle, tiny_config
from transformers import TrainerCallback

from sleep_trl.sleep import SleepCycle


class RecordArgs(TrainerCallback):
    seen: list = []

    def on_train_begin(self, args, state, control, **kwargs):
        RecordArgs.seen.append((Path(args.output_dir).name, list(args.report_to), args.run_name))


def test_every_phase_reports_to_the_configured_integration_under_its_own_run_name(tmp_path, monkeypatch):
    RecordArgs.seen = []
    original = SleepCycle._callbacks
    monkeypatch.setattr(SleepCycle, "_callbacks", lambda self: [*original(self), RecordArgs()])
    out = tmp_path / "run"
    run_cycle(tiny_config(out, "--report_to", "tensorboard", "--run_name", "exp", "--num_sessions", "1", "--dream", "true",
                          "--dream_args.max_steps", "1", "--dream_args.num_dreams", "2",
                          "--dream_args.num_selected_dreams", "1"))
    phases = ["s0-wake", "s0-consolidate", "s0-dream"]
    assert RecordArgs.seen == [(p, ["tensorboard"], f"exp-{p}") for p in phases]
    for phase in phases:  # TensorBoard event files in each phase's folder
        assert list((out / "trainer" / phase).rglob("events.out.tfevents.*")), phase


def test_logging_fields_do_not_change_the_run_identity(tmp_path):
    plain = tiny_config(tmp_path / "a")
    logged = tiny_config(tmp_path / "b", "--report_to", "tensorboard", "--run_name", "x")
    assert plain.fingerprint() == logged.fingerprint()
    assert plain.phase_config("wake_args", output_dir=str(tmp_path), seed=0).report_to == []
    assert logged.phase_config("wake_args", output_dir=str(tmp_path), seed=0).report_to == ["tensorboard"]
    section = tiny_config(tmp_path / "c", "--report_to", "tensorboard", "--wake_args.report_to", "none")
    assert section.phase_config("wake_args", output_dir=str(tmp_path), seed=0).report_to == []
    assert section.phase_config("consolidation_args", output_dir=str(tmp_path), seed=0).report_to == ["tensorboard"]
