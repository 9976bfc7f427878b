"""Export a checkpoint: `python launch/export.py runs/x/checkpoints --out runs/x/ema.safetensors`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_train.training.export import export_main  # noqa: E402

if __name__ == "__main__":
    export_main()
