"""The LightningCLI behind `vlmoe fit|validate|test` (a module-level class, so that
`ddp_spawn`-style launchers can pickle the trainer that refers to it)."""
from lightning.pytorch.cli import LightningCLI

__all__ = ["VLMoECLI"]


class VLMoECLI(LightningCLI):
    """`vlmoe fit|validate|test --config ...`: LIMoEModule + ClipDataModule, with the
    data's image size and context length taken from `--model.model_name`."""

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("model.model_name", "data.init_args.model_name" if self.subclass_mode_data else "data.model_name")
