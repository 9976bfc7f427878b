"""Train one stage: `deepspeed launch/train.py --config configs/sr256-400m.yaml [--set key=value ...]`.

`--print-config` prints the resolved config (every default filled in) and the DeepSpeed config
it generates (for WORLD_SIZE ranks, default 1), then exits; a run writes both into its run
folder at start (config.yaml, deepspeed_config.json). A refused run (a config error, a missing
file, another run's checkpoint) says why once, on rank 0, and exits 2; unexpected errors keep
their tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=FutureWarning)

from imagen_train.config import Config, ConfigError, load_config  # noqa: E402
from imagen_train.training.preemption import STOPPED_BEFORE_START, StopRequest  # noqa: E402
from imagen_train.utils.signals import survive_closed_output  # noqa: E402


def _is_lost_peer(err: BaseException) -> bool:
    """A collective failed because a peer died, hung past the timeout or closed its connection."""
    import torch.distributed as tdist  # loaded with the trainer, after the stop signals are caught
    if isinstance(err, getattr(tdist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(word in text for word in (
        "connection closed", "connection reset", "timed out", "timeout", "broken pipe", "gloo", "nccl"))


def render_config(cfg: Config, source: str) -> str:
    """Two YAML documents: the resolved config, then the DeepSpeed config generated from it."""
    import yaml

    from imagen_train.training import engine  # imports DeepSpeed (seconds): only when asked

    world = int(os.environ.get("WORLD_SIZE", 1))
    on_cpu = engine.device_type() == "cpu"
    ds_config = engine.build_deepspeed_config(cfg, world, on_cpu)
    return (f"# The resolved config of {source}, every default filled in (a run writes it to "
            f"{cfg.run_dir}/config.yaml)\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            + f"---\n# The DeepSpeed config it generates for {world} rank(s) on "
            f"{'a CPU' if on_cpu else 'GPUs'} (set WORLD_SIZE for another count; a run writes it to "
            f"{cfg.run_dir}/deepspeed_config.json)\n" + yaml.safe_dump(ds_config, sort_keys=False))


def _is_refusal(err: BaseException) -> bool:
    """An error that refuses a run before it starts (a config error, missing metric weights or
    statistics): every rank meets the same one."""
    # Loaded with the trainer by now; imported here so that the start stays fast.
    from imagen_train.evaluation.fid import FIDStatsPipelineError
    from imagen_train.evaluation.weights import MissingWeightsError
    return isinstance(err, (ConfigError, MissingWeightsError, FIDStatsPipelineError))


def run(argv: list[str] | None = None) -> int:
    """`main`, with a refused run said once, on rank 0, without a traceback (exit 2)."""
    try:
        return main(argv)
    except Exception as err:
        if not _is_refusal(err):
            raise
        # utils.dist imports torch: not at the top, where it would run before the stop signals
        # are caught (main installs them first thing).
        from imagen_train.utils.dist import rank as process_rank
        if process_rank() == 0:
            print(f"[train] refused: {err}", file=sys.stderr, flush=True)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="stage YAML, e.g. configs/sr256-400m.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set optim.lr=3e-5 (repeatable)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (newest complete checkpoint, if any), 'none', or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and the DeepSpeed config it generates (for "
                             "WORLD_SIZE ranks, default 1) as YAML, then exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config):
        raise ConfigError("--config", "an existing YAML file, e.g. configs/base64-2b.yaml", args.config)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(render_config(cfg, args.config), flush=True)
        return 0
    # A stop through DeepSpeed's multi-node runner closes the ssh sessions that carry this
    # rank's output: keep printing (to run_dir/output-rankR.log) rather than die mid-save.
    survive_closed_output(lambda: os.path.join(cfg.run_dir, f"output-rank{os.environ.get('RANK', '0')}.log"))
    # Catch stop signals and watch the launchers from the start, before the slow imports, the
    # rendezvous and the engine build: a stop then ends the process at once (nothing to save,
    # exit code STOPPED_BEFORE_START); from the first step on it is saved at a step boundary.
    stop = StopRequest(cfg.training.stop_signals, exit_before_start=STOPPED_BEFORE_START).install()

    from imagen_train.evaluation.periodic import make_periodic_evaluator
    from imagen_train.training.checkpoint import CheckpointError, CheckpointWriteError
    from imagen_train.training.trainer import Trainer, TrainingStopped
    from imagen_train.utils.dist import is_main, print0, rank, shutdown

    try:
        evaluator = None
        if cfg.evaluation.eval_every_steps > 0:
            evaluator = make_periodic_evaluator(cfg)
        result = Trainer(cfg, resume=args.resume, evaluator=evaluator, stop=stop).run()
    except TrainingStopped as err:
        if is_main():
            print(f"[train] stopped: {err}", file=sys.stderr, flush=True)
        shutdown()  # every rank agreed to stop
        return 3
    except CheckpointError as err:
        # Every rank that hit a write error says so: it may be on one rank only. A refused
        # checkpoint (another run's, or a damaged one) is the same on every rank: rank 0 says it.
        if isinstance(err, CheckpointWriteError) or rank() == 0:
            print(f"[train] rank {rank()}: checkpoint error: {err}", file=sys.stderr, flush=True)
        return 4
    except Exception as err:
        if not _is_lost_peer(err):
            raise
        print(f"[train] rank {rank()}: lost another rank or a collective timed out "
              f"(training.dist_timeout_s={cfg.training.dist_timeout_s}): {type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''}. Completed checkpoints are intact; "
              f"restart with --resume auto.", file=sys.stderr, flush=True)
        return 5
    print0(f"[train] done at step {result.step}; last checkpoint {result.last_checkpoint}")
    shutdown()
    return 0


if __name__ == "__main__":
    code = run()
    from imagen_train.utils.dist import exit_process
    exit_process(code)  # skips the interpreter's teardown, where gloo's threads can abort a finished rank
