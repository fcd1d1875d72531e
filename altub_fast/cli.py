"""The ``altub-fast`` command: ``altub-fast eval|predict|export [options]`` (the same as
``python -m altub_fast.eval`` / ``.predict`` / ``.export``; ``-h`` after a command for its options)."""
from __future__ import annotations

import sys
from typing import List, Optional

COMMANDS = {
    "eval": "train and score an MVTec AD category (python -m altub_fast.eval)",
    "predict": "score new images with a trained checkpoint (python -m altub_fast.predict)",
    "export": "export a checkpoint to ONNX, OpenVINO or TorchScript (python -m altub_fast.export)",
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: altub-fast COMMAND [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:8s} {text}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "eval":
        from .eval import main as eval_main
        return eval_main(rest)
    if cmd == "predict":
        from .predict import main as predict_main
        return predict_main(rest)
    if cmd == "export":
        from .export import main as export_main
        return export_main(rest)
    print(f"altub-fast: unknown command {cmd!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
