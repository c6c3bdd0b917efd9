"""Command line: ``python -m hm_utils.data list`` prints every registered data set.

For each task it prints the language, task type, split sizes under the default caps and
the source. Embedded tasks are loaded (offline, a few seconds in all). Public tasks are
loaded only when ``--source NAME=PATH`` names a local file, folder or hub id; otherwise
their sizes show as ``-``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hm_utils.data.splits import DEFAULT_CAPS, SPLITS
from hm_utils.data.tasks import TASKS, prepare_task

logger = logging.getLogger(__name__)


def _parse_sources(pairs: list[str]) -> dict[str, str]:
    sources = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name or not value:
            raise SystemExit(f"invalid --source {pair!r}; expected NAME=PATH_OR_HUB_ID")
        if name not in TASKS:
            raise SystemExit(f"unknown task {name!r} in --source; registered: {', '.join(sorted(TASKS))}")
        sources[name] = value
    return sources


def task_rows(seed: int, sources: dict[str, str]) -> list[dict[str, object]]:
    """Return one row per registered task: name, language, task type, split sizes, source."""
    rows = []
    for name, spec in TASKS.items():
        row: dict[str, object] = {
            "name": name,
            "language": spec.language,
            "task_type": spec.task_type,
            "sizes": None,
            "source": spec.source if spec.embedded else f"{spec.source} [{sources.get(name) or spec.default_source or 'no default: pass --source'}]",
        }
        if spec.embedded or name in sources:
            prepared = prepare_task(name, seed, DEFAULT_CAPS, source=sources.get(name))
            row["sizes"] = {split: len(prepared.splits[split]) for split in SPLITS}
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """Format rows from :func:`task_rows` as a fixed-width table."""
    header = ["name", "lang", "type", *SPLITS, "source"]
    lines = []
    for row in rows:
        sizes = row["sizes"] or {}
        lines.append([
            str(row["name"]), str(row["language"]), str(row["task_type"]),
            *(str(sizes.get(split, "-")) for split in SPLITS), str(row["source"]),
        ])
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header) - 1)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  source"]
    for line in lines:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    parser = argparse.ArgumentParser(prog="python -m hm_utils.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="print every registered data set with its split sizes")
    listing.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    listing.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                         help="load public task NAME from a local path or hub id (repeatable)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        rows = task_rows(args.seed, _parse_sources(args.source))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        caps = ", ".join(f"{split} {cap}" for split, cap in DEFAULT_CAPS.items())
        print(format_table(rows))
        print(f"\nsizes use seed {args.seed} and this command's caps ({caps}), not a profile's; '-' means not loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
