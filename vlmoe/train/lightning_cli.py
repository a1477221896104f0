"""The LightningCLI behind `vlmoe fit|validate|test --config ...` (a module-level class, so
that `ddp_spawn`-style launchers can pickle the trainer that refers to it)."""
from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path

import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.cli import LightningCLI

from ..errors import ConfigError, NotFound
from ..models.checkpoint import read_checkpoint
from ..models.factory import resolve_config

__all__ = ["VLMoECLI", "claim_version_dir"]

_CSV = "lightning.pytorch.loggers.CSVLogger"
_VERSIONED = ("CSVLogger", "TensorBoardLogger")
_LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def _is_global_zero_process() -> bool:
    """False in the processes a launcher started for ranks other than 0 (torchrun, SLURM,
    Lightning's own DDP launcher), which re-run the CLI."""
    return not any(int(os.environ.get(k, "0") or 0) > 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"))


def claim_version_dir(save_dir: str | os.PathLike, name: str = "lightning_logs") -> int:
    """Create `save_dir/name/version_N` with the next free N and return N. `mkdir` is atomic,
    so two runs started at once into the same folder never share a version."""
    base = Path(save_dir) / (name or "")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {base}: {e.strerror}; pass a writable --trainer.default_root_dir") from None
    taken = [int(d.name[8:]) for d in base.iterdir() if d.name.startswith("version_") and d.name[8:].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (base / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1
        except OSError as e:
            raise ConfigError(f"cannot create the output folder {base}: {e.strerror}; pass a writable --trainer.default_root_dir") from None


def _plain(v):
    """Comparable form of a hyper-parameter (tuples and lists alike, Namespaces as dicts)."""
    if isinstance(v, Namespace):
        v = v.as_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _config_error(message: str, argv: list[str]) -> str:
    """jsonargparse's parse error as one line that names the key, and where to look."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    # jsonargparse lists, for a subclass or union type, every alternative it tried: keep the first lines
    text = " ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")
    sub = next((a for a in argv if a in ("fit", "validate", "test")), None)
    return f"{text} (see: vlmoe {sub + ' ' if sub else ''}--help)"


_EVAL_ONLY = ("eval_routing", "eval_capacity_factor")  # how a model evaluates, not what it is


def _architecture(hp: dict) -> dict:
    """The model config of (model_name, model_overrides), without the evaluation-only keys."""
    cfg = resolve_config(hp["model_name"], **(hp["model_overrides"] or {}))
    for section in [cfg.get("moe") or {}, *((cfg.get("moe") or {}).get(m) or {} for m in ("image", "text"))]:
        for k in _EVAL_ONLY:
            section.pop(k, None)
    return cfg


class VLMoECLI(LightningCLI):
    """`vlmoe fit|validate|test --config ...`: LIMoEModule + ClipDataModule, with the
    data's image size and context length taken from `--model.model_name`.

    Beyond LightningCLI:
    * every output of a run lands under `--trainer.default_root_dir` (the default logger is
      a CSVLogger there), in a `version_N` folder claimed atomically;
    * `--ckpt_path` does not silently replace the configured model: the checkpoint's
      hyper-parameters fill only what no config file and no flag set (a flag or config value
      that differs from the checkpoint wins, with a note on stderr); a checkpoint of another
      architecture than the one configured is refused.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (no predict: the module has no predict_step)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def init_parser(self, **kwargs):
        # A parse error is raised, not printed with ~70 lines of usage: parse_arguments turns
        # it into one ConfigError line (the usage stays with --help).
        kwargs["exit_on_error"] = False
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("model.model_name", "data.init_args.model_name" if self.subclass_mode_data else "data.model_name")

    # -- --ckpt_path ---------------------------------------------------------------------
    def parse_arguments(self, parser, args) -> None:
        self._raw_args = list(sys.argv[1:] if args is None else args) if not isinstance(args, (dict, Namespace)) else []
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            raise ConfigError(_config_error(str(e), self._raw_args)) from None

    def _explicit_model_keys(self, cfg) -> set[str]:
        """Model arguments the user set: in a config file's `model:` section or as a flag."""
        keys = set()
        for path in cfg.get("config") or []:
            try:
                section = (yaml.safe_load(Path(str(path)).read_text()) or {}).get("model") or {}
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if isinstance(section, dict):
                keys |= set(section.get("init_args", section))
        for a in getattr(self, "_raw_args", []):
            m = re.match(r"--model\.(\w+)", a)
            if m:
                keys.add(m.group(1))
        return keys

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which copies every hyper-parameter of the checkpoint over
        the config (a clip-tiny checkpoint silently turned a limoe-tiny config into clip-tiny,
        and `--model.lr 0.5` was dropped on resume)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        path = cfg.get("ckpt_path")
        if sub in ("validate", "test") and not path and not (cfg.get("model") or {}).get("pretrained") and _is_global_zero_process():
            print(f"vlmoe: note: {sub} without --ckpt_path or --model.pretrained evaluates randomly initialised weights",
                  file=sys.stderr, flush=True)
        if not path or str(path) in _LIGHTNING_CKPT_KEYWORDS or "://" in str(path):
            return
        if Path(path).is_dir():
            found = sorted(Path(path).glob("**/last.ckpt"))
            hint = f" (e.g. --ckpt_path {found[-1]})" if found else ""
            raise NotFound(f"--ckpt_path {path} is a folder: name the checkpoint file in it{hint}")
        if not Path(path).is_file():
            raise NotFound(f"--ckpt_path {path}: no such file")
        hp = read_checkpoint(path).get("hyper_parameters") or {}
        if not isinstance(hp, dict) or "model_name" not in hp or self.subclass_mode_model:
            return
        model = cfg.model
        defaults = {k: p.default for k, p in inspect.signature(self.model_class.__init__).parameters.items()
                    if k != "self" and p.default is not inspect.Parameter.empty}
        explicit = self._explicit_model_keys(cfg)
        arch_keys = ("model_name", "model_overrides")
        given = {k: _plain(model.get(k)) for k in arch_keys}
        saved = {k: _plain(hp.get(k)) for k in arch_keys}
        if given != saved:
            if not explicit & set(arch_keys):
                # Nothing about the model was configured: resume the checkpoint's model.
                for k in arch_keys:
                    model[k] = hp.get(k)
                data = cfg.data.init_args if self.subclass_mode_data else cfg.data
                data["model_name"] = hp["model_name"]
            elif _architecture(given) != _architecture(saved):
                raise ConfigError(
                    f"--ckpt_path {path} holds a {saved['model_name']} model (model_overrides={saved['model_overrides']}), but the "
                    f"config asks for {given['model_name']} (model_overrides={given['model_overrides']}). Use the config the "
                    f"checkpoint was trained with, or drop --ckpt_path to start a new run"
                )
        for k, v in hp.items():
            if k in arch_keys or k == "pretrained" or k not in defaults or k not in model:
                continue
            mine = _plain(model.get(k))
            if k not in explicit:
                model[k] = v  # not set by the user: the checkpoint's value, as LightningCLI does
            elif mine != _plain(v):
                print(f"vlmoe: --model.{k}={mine} from the config / command line replaces the checkpoint's {_plain(v)}",
                      file=sys.stderr)

    # -- outputs under default_root_dir ----------------------------------------------------
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.get("trainer")
        if trainer is None:
            return
        root = trainer.get("default_root_dir") or os.getcwd()
        if trainer.get("logger") in (None, True):
            trainer["logger"] = Namespace(class_path=_CSV, init_args=Namespace(save_dir=str(root), name="lightning_logs"))
        if not _is_global_zero_process():
            return
        loggers = trainer["logger"] if isinstance(trainer["logger"], list) else [trainer["logger"]]
        for logger in loggers:
            if not isinstance(logger, Namespace) or not str(logger.get("class_path", "")).endswith(_VERSIONED):
                continue
            args = logger.get("init_args") or Namespace()
            if args.get("version") is None:
                args["version"] = claim_version_dir(args.get("save_dir") or root, args.get("name", "lightning_logs"))
                logger["init_args"] = args
            break  # Lightning's log_dir follows the first logger
