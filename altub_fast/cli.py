"""The ``altub-fast`` command: ``altub-fast eval [options]`` (see ``python -m altub_fast.eval -h``)."""
from __future__ import annotations

import sys
from typing import List, Optional

COMMANDS = {"eval": "train and score an MVTec AD category (python -m altub_fast.eval)"}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: altub-fast COMMAND [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:6s} {text}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "eval":
        from .eval import main as eval_main
        return eval_main(rest)
    print(f"altub-fast: unknown command {cmd!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
