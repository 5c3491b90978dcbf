"""TRL's model cards for sleep-trl's trainers, with the base model named right.

TRL names the base model from `config._name_or_path` and leaves it out for any local folder, so a card of a model
loaded from the packaged SmolLM2 copy (or any local checkpoint) read "a fine-tuned version of [None]". Here the
packaged models are named by the Hub repository they copy (`assets.hub_id`), and a model that is no Hub repository
is called a local model, by its folder name.
"""

from __future__ import annotations

from pathlib import Path

from ..assets import hub_id


class NamedBaseModelCardMixin:
    """Put before the TRL trainer in the bases: `create_model_card` with the base model resolved."""

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        model = self.accelerator.unwrap_model(self.model)
        config = getattr(getattr(model, "base_model", model), "config", model.config)
        saved = config._name_or_path
        known = hub_id(saved)
        if known:
            config._name_or_path = known
        try:
            super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        finally:
            config._name_or_path = saved
        card = Path(self.args.output_dir) / "README.md"
        if not known and self.is_world_process_zero() and card.exists():
            local = Path(str(saved)).name or "a local model"
            text = card.read_text().replace(
                "a fine-tuned version of [None](https://huggingface.co/None)", f"a fine-tuned version of a local model (`{local}`)"
            )
            card.write_text(text)
