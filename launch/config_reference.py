"""Write docs/config-reference.md from the config schema: every key, its type, default and meaning.

    python launch/config_reference.py            # rewrite docs/config-reference.md
    python launch/config_reference.py --check    # exit 1 if the file is not current (tests run this)

The meaning of a key is the comment above it (or at the end of its line) in the dataclass that
declares it, and each section's docstring; so the reference changes with the schema, in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import typing
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_train.config import Config, _type_name  # noqa: E402
from imagen_train.evaluation.pipeline_config import InferencePipelineConfig  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "config-reference.md"
HEADER = """# Config reference

Generated from the schema by `python launch/config_reference.py` (do not edit by hand;
`tests/test_config_reference.py` fails when it is not current). Set any key in a YAML file or
with `--set section.key=value`; `python launch/train.py --config FILE --print-config` prints a
config with every default filled in.
"""


def field_comments(cls: type) -> dict[str, str]:
    """{field: its meaning} from the class's source: the comment block above the field, or at the
    end of its line; a field with neither takes the block above an earlier field that names it."""
    notes, block, last_block = {}, [], ""
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            block.append(text.lstrip("#").strip())
            continue
        match = re.match(r"(\w+)\s*:[^=]*(=.*)?$", text)
        if match and not text.startswith(("def ", "return", "class ")):
            name = match.group(1)
            trailing = text.split("  # ", 1)[1].strip() if "  # " in text else ""
            trailing = "" if trailing.startswith(("type:", "noqa")) else trailing
            if block:
                last_block = " ".join(block)
            own = " ".join(block + ([trailing] if trailing else []))
            notes[name] = own or (last_block if re.search(rf"\b{name}\b", last_block) else "")
        block = []
    return notes


def _value(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _default(f: dataclasses.Field, tp: type) -> str:
    """The default as shown; a section's default names only what differs from its class's defaults."""
    value = _value(f)
    if dataclasses.is_dataclass(value):
        changed = {k: v for k, v in dataclasses.asdict(value).items()
                   if v != dataclasses.asdict(tp()).get(k)}
        return ", ".join(f"`{k}={v!r}`" for k, v in changed.items()) or "(its defaults)"
    return "null" if value is None else f"`{value!r}`".replace("|", "\\|")


def _anchor(title: str) -> str:
    """GitHub's anchor of a `## ` heading."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def sections(cls: type, prefix: str = "", done: dict | None = None) -> list[str]:
    """Markdown: one table per dataclass, nested sections after their parent; a class met again
    (the sampler of every stage) is linked, not repeated."""
    done = {} if done is None else done  # class -> the title of the section that shows it
    hints = typing.get_type_hints(cls)
    notes = field_comments(cls)
    title = f"`{prefix.rstrip('.') or cls.__name__}` ({cls.__name__})"
    done[cls] = title
    out = [f"## {title}", "", inspect.getdoc(cls) or "", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, key = hints[f.name], f"{prefix}{f.name}"
        meaning = notes.get(f.name, "").replace("|", "\\|")
        if dataclasses.is_dataclass(tp):
            if tp not in done:
                done[tp] = f"`{key}` ({tp.__name__})"  # rendered below, under this key
                nested.append((f.name, tp))
            target = done[tp]
            meaning = (meaning + " " if meaning else "") + f"Section: see [{tp.__name__}](#{_anchor(target)})."
            out.append(f"| `{key}` | {tp.__name__} | {_default(f, tp)} | {meaning} |")
            continue
        out.append(f"| `{key}` | {_type_name(tp).replace('|', '/')} | {_default(f, tp)} | {meaning} |")
    out.append("")
    for name, tp in nested:
        out += sections(tp, f"{prefix}{name}.", done)
    return out


def render() -> str:
    """The whole reference page."""
    done: dict = {}
    parts = [HEADER, "# Training configs (`launch/train.py --config`, `configs/<stage>-<size>.yaml`)", ""]
    parts += sections(Config, "", done)
    parts += ["# The inference pipeline (`launch/sample.py`, `launch/evaluate.py`, "
              "`configs/inference_pipeline.yaml`)", ""]
    parts += sections(InferencePipelineConfig, "", done)
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config-reference.md is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is not current: run python launch/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
