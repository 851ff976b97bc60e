"""The command lines' help layout, shared by `python -m export`, `python -m runtime_py` and
`python -m models` (and their console scripts): the module docstring as the description, its line
breaks kept (usage examples read as written), and each option's default shown where it has one."""

from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks; appends "(default: X)" to an option's help
    when it has a default and the help does not already speak of one (not for flags or unset
    options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS  # (0 and 0.0 are shown)
        if "%(default)" in text or "default" in text.lower() or unset:
            return text
        return f"{text} (default: %(default)s)"


def prog(module: str) -> str:
    """The program name help shows: the console script's name when run as one (gemma-edge-export),
    else `python -m MODULE`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("gemma-edge-") else f"python -m {module}"
