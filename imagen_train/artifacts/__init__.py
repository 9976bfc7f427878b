"""Artifacts: the files training writes and evaluation reads, below both layers.

- `checkpoints`: checkpoint folder names, manifests, `latest`, verification, per-rank state
  files, the saved config, and the refusal of a checkpoint of another run;
- `same_model`: the refusal of a checkpoint whose config builds another network;
- `ema`: stitching the full EMA weights from the ranks' slices (`stitch`, which checks that the
  slices tile each parameter with `check_tiling`);
- `exports`: the exported .safetensors format (`export_checkpoint` writes one from a checkpoint
  folder), and loading a stage's network for inference from an export or a checkpoint folder.

Nothing here imports DeepSpeed (except, on demand, to read the raw weights out of DeepSpeed's
own checkpoint files), enters a collective, or imports `imagen_train.training`.
"""

from .checkpoints import (CONFIG_FILE, LATEST, MANIFEST, STAGING_PREFIX, CheckpointError, CheckpointWriteError,
                          check_resume_target, file_sha256, find_checkpoint, find_resume_tag, list_complete,
                          read_all_rank_states, read_config, read_rank_state, refuse_other_run, resume_candidates,
                          staging_tag, step_of, tag_for, verify)
from .same_model import model_differences, refuse_other_model
from .ema import ema_slices_for, ema_state_dict, slice_bounds, stitch
from .exports import (CONFIG_KEY, export_checkpoint, exported_config, load_exported, load_network, raw_weights,
                      stage_config, write_export)

__all__ = ["CONFIG_FILE", "CONFIG_KEY", "LATEST", "MANIFEST", "STAGING_PREFIX", "CheckpointError",
           "CheckpointWriteError", "check_resume_target", "ema_slices_for", "ema_state_dict", "export_checkpoint", "exported_config",
           "file_sha256", "find_checkpoint", "model_differences", "find_resume_tag", "list_complete", "load_exported", "load_network",
           "raw_weights", "read_all_rank_states", "read_config", "read_rank_state", "refuse_other_model", "refuse_other_run",
           "resume_candidates", "slice_bounds", "staging_tag", "stage_config", "step_of", "stitch", "tag_for",
           "verify", "write_export"]
