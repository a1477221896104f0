"""Class names and prompt templates for zero-shot classification: files or built-in sets."""
from __future__ import annotations

from pathlib import Path

from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from .shards import read_lines

__all__ = ["load_classnames", "load_templates", "BUILTIN_CLASSNAMES", "BUILTIN_TEMPLATES", "DIGIT_NAMES", "DIGIT_TEMPLATES"]

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = ["a photo of the digit {}.", "handwritten {}.", "the number {}.", "a drawing of a {}."]

BUILTIN_CLASSNAMES = {"digits": DIGIT_NAMES, "imagenet": list(IMAGENET_CLASSNAMES)}
BUILTIN_TEMPLATES = {"digits": DIGIT_TEMPLATES}


def _template_strings(templates) -> list[str]:
    return [t if isinstance(t, str) else t("{}") for t in templates]


BUILTIN_TEMPLATES["openai_imagenet"] = _template_strings(OPENAI_IMAGENET_TEMPLATES)
BUILTIN_TEMPLATES["simple_imagenet"] = _template_strings(SIMPLE_IMAGENET_TEMPLATES)


def load_classnames(spec: str | list[str]) -> list[str]:
    """A class-names file (one per line, in label order) or a built-in set name."""
    if isinstance(spec, list):
        names = spec
    elif spec in BUILTIN_CLASSNAMES and not Path(spec).exists():
        names = list(BUILTIN_CLASSNAMES[spec])
    else:
        names = read_lines(spec, "class-names")
    if len(set(names)) != len(names):
        raise ValueError(f"class names in {spec} are not unique")
    return names


def load_templates(spec: str | list[str]) -> list[str]:
    """A templates file (one per line, `{}` where the class name goes) or a built-in set."""
    if isinstance(spec, list):
        templates = spec
    elif spec in BUILTIN_TEMPLATES and not Path(spec).exists():
        templates = list(BUILTIN_TEMPLATES[spec])
    else:
        templates = read_lines(spec, "templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates need '{{}}' where the class name goes; these have none: {bad[:5]}")
    return templates
