"""Writes docs/config.md, the config file's reference, from the declarations in modelmux_common/config.

``python scripts/gen_config_docs.py`` rewrites it (``make config-docs``); with ``--check`` it only
fails (exit 1) when the file differs from what the declarations give (``make check``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from modelmux_common.config import rules
from modelmux_common.config.fields import RULES, Spec, key_of, spec_of
from modelmux_common.config.schema import Document

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"

INTRO = """\
# Configuration reference

<!-- Written by scripts/gen_config_docs.py from modelmux_common/config (make config-docs): edit the
declarations there, not this file. -->

One YAML file configures every daemon (`modelmux gateway|sync|up --config FILE`). Values are
layered: defaults < YAML < environment (`MODELMUX_<SECTION>_<KEY>` for the `gateway` and
`modelsync` sections, e.g. `MODELMUX_GATEWAY_LISTEN`) < command-line flags (`--listen`,
`--workers`, `--target`). A bad file stops start-up (exit status 2) with the file, the key path
(e.g. `apis[2].handler.processes_per_replica`) and what is wrong; unknown keys are errors.

Kinds of values: a *duration* is plain seconds (`10`, `2.5`) or a number with `ms`, `s`, `m` or
`h` (`500ms`, `5m`); a *size* is plain bytes or a number with `KB`, `MB`, `GB`, `TB` (powers of
1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024); a *folder* or *file* is relative to the
config file's folder; a *name* is letters, digits, `_`, `.`, `-` (starting with a letter or digit,
at most 128 characters); a *boolean* also takes `yes`/`no`, `on`/`off`, `1`/`0`.
"""


def sections(cls: type, key: str, doc: str) -> list[str]:
    """The section ``cls`` at ``key``: its table and rules, then its sections' (depth first)."""
    lines = [f"## `{key}`" if key else "## Top level", "", doc, ""]
    lines += ["| key | kind | default | range | meaning |", "| --- | --- | --- | --- | --- |"]
    nested: list[tuple[type, str, str]] = []
    for f in dataclasses.fields(cls):
        spec = spec_of(f)
        name = f"{key}.{key_of(f)}" if key else key_of(f)
        kind = spec.kind.name
        if spec.section is not None:
            sub = f"{name}[]" if spec.many else name
            nested.append((spec.section, sub, spec.doc))
            kind = "list of sections" if spec.many else "section"
        elif name == "version_labels":
            name = "version_labels.<model>.<label>"
        lines.append(
            f"| `{name}` | {kind} | {default(f, spec)} | {spec.range or ''} | {spec.doc} |"
        )
    checks = [summary(check) for check in RULES.get(cls, ())]
    if checks:
        lines += ["", "Rules:", "", *(f"- {check}" for check in checks)]
    lines.append("")
    for section, sub, text in nested:
        lines += sections(section, sub, text)
    return lines


def default(f: dataclasses.Field[Any], spec: Spec) -> str:
    if spec.default_doc or spec.required:
        return spec.default_doc or "required"
    if spec.section is not None:
        return ""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return ""
    shown = spec.kind.show(value)
    return '`""`' if shown == "''" else f"`{shown.strip(chr(39))}`"


def render() -> str:
    lines = [INTRO, *sections(Document, "", "The file is a mapping of these sections.")]
    lines += ["## Rules the gateway adds", ""]
    lines += ["Checked when the gateway loads the file (`modelmux gateway`, `modelmux up`):", ""]
    lines += [f"- {summary(check)}" for check in rules.GATEWAY_RULES]
    return "\n".join(lines) + "\n"


def summary(fn: Any) -> str:
    return " ".join((fn.__doc__ or "").split("\n\n")[0].split())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when docs/config.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print("docs/config.md is stale: run make config-docs and commit", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
