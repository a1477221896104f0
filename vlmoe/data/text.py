"""Class names and prompt templates for zero-shot classification: files or built-in sets."""
from __future__ import annotations

from pathlib import Path

from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from .shards import read_lines
from ..errors import DataError

__all__ = ["load_classnames", "load_templates", "BUILTIN_CLASSNAMES", "BUILTIN_TEMPLATES", "DIGIT_NAMES", "DIGIT_TEMPLATES"]

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = ["a photo of the digit {}.", "handwritten {}.", "the number {}.", "a drawing of a {}."]

BUILTIN_CLASSNAMES = {"digits": DIGIT_NAMES, "imagenet": list(IMAGENET_CLASSNAMES)}
BUILTIN_TEMPLATES = {"digits": DIGIT_TEMPLATES}


def _template_strings(templates) -> list[str]:
    return [t if isinstance(t, str) else t("{}") for t in templates]


BUILTIN_TEMPLATES["openai_imagenet"] = _template_strings(OPENAI_IMAGENET_TEMPLATES)
BUILTIN_TEMPLATES["simple_imagenet"] = _template_strings(SIMPLE_IMAGENET_TEMPLATES)


def _load_list(spec: str | list[str], builtins: dict[str, list[str]], what: str) -> list[str]:
    if isinstance(spec, list):
        return list(spec)
    if spec in builtins and not Path(spec).exists():
        return list(builtins[spec])
    return read_lines(spec, what)


def load_classnames(spec: str | list[str]) -> list[str]:
    """A class-names file (one per line, in label order) or a built-in set name."""
    names = _load_list(spec, BUILTIN_CLASSNAMES, "class-names")
    if len(set(names)) != len(names):
        raise DataError(f"class names in {spec} are not unique")
    return names


def load_templates(spec: str | list[str]) -> list[str]:
    """A templates file (one per line, `{}` or CLIP_benchmark's `{c}` where the class name
    goes) or a built-in set; returned with `{}`."""
    templates = [t.replace("{c}", "{}") for t in _load_list(spec, BUILTIN_TEMPLATES, "templates")]
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise DataError(f"templates need '{{}}' (or '{{c}}') where the class name goes; these have none: {bad[:5]}")
    return templates
