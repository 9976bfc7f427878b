"""Export a checkpoint: `python launch/export.py runs/sr256-400m/checkpoints --out runs/sr256-400m/ema.safetensors`.

The checkpoint may be a checkpoints root (its `latest` is exported) or one step_NNNNNNNN folder.
A missing, incomplete or corrupt checkpoint is named in one line on stderr (exit 2).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_train.artifacts import CheckpointError  # noqa: E402
from imagen_train.config import ConfigError  # noqa: E402
from imagen_train.training.export import export_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the export; 2 with a one-line message for a checkpoint that cannot be exported."""
    try:
        export_main(argv)
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"[export] {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
