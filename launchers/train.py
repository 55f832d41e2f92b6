"""Train an AutoCompressor: `python|torchrun|deepspeed|srun launchers/train.py --config X.yaml [key=value ...]`.

Overrides use dotted keys (train.max_steps=20 data.path=DIR); docs/TRAINING.md lists them all.

Exit status (docs/RELIABILITY.md): 0 done, or stopped by SIGTERM/SIGUSR1 after checkpointing (run the same
command again to resume; `train.preempt_exit_code` changes this one, the SLURM templates use 75); 2 bad
config or data, found before any training step (also: another run holds train.output_dir, no usable
checkpoint to resume, the corpus changed under the run before its export); 3 stopped after
`train.max_bad_steps` non-finite losses in a row; 130 Ctrl-C (after a checkpoint; a second Ctrl-C, or one
during set-up, without one); 1 anything else (a lost rank, a failed checkpoint write, a crash). Known failures print one
line starting with "error:" (or "config error:", "data error:"), not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from acomp.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    cfg = config_or_none(args.config, args.overrides)
    return 2 if cfg is None else train(cfg)[0]


def config_or_none(path: str, overrides: list[str]):
    """The run config, or None after one `config error:` line (exit status 2)."""
    try:
        return load_config(path, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def train(cfg) -> tuple[int, bool]:
    """Runs training: (the exit status the module docstring lists, whether training finished; a preempted run
    can exit 0 too)."""
    from acomp.data import CorruptShardError
    from acomp.train import Preempted, run
    from acomp.train.badsteps import NonFiniteLossError
    from acomp.train.checkpoint import CheckpointWriteError, ResumeError
    from acomp.train.data import DataError
    from acomp.train.distributed import is_comm_error
    from acomp.train.runlock import OutputDirBusyError

    try:
        out = run(cfg)
    except (ResumeError, OutputDirBusyError) as e:
        return fail("error", e, 2), False
    except (DataError, CorruptShardError) as e:
        return fail("data error", e, 2), False
    except ConfigError as e:
        return fail("config error", e, 2), False
    except Preempted as e:
        print(str(e), file=sys.stderr)
        # Ctrl-C means stop: 130, as for any interrupted command (75 would make the SLURM templates requeue).
        return (130 if e.signal_name == "SIGINT" else cfg.train.preempt_exit_code), False
    except NonFiniteLossError as e:
        return fail("error", e, 3), False
    except CheckpointWriteError as e:
        return fail("error", e, 1), False
    except Exception as e:
        if not is_comm_error(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        status = fail(
            "error",
            f"lost contact with the other ranks ({first}): another rank died or hangs (see its log; "
            f"collectives time out after train.dist_timeout_s={cfg.train.dist_timeout_s}s); rerun to resume "
            f"from the last checkpoint",
            1,
        )
        # Leave without tearing anything down: destroying the broken process group, and interpreter shutdown
        # (its destructor, threads still waiting on the peer), can block on the lost rank (seen once in a CI run: the
        # line above printed, then no exit within 60 s). Checkpoints are fsync'd and the metrics file closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(f"done: {out}")
    return 0, True


def interrupted() -> int:
    """Ctrl-C during set-up, or a second one during training: nothing saved since the last checkpoint."""
    print("interrupted (SIGINT): stopped without a checkpoint", file=sys.stderr, flush=True)
    return 130


def fail(kind: str, error, status: int) -> int:
    """One line naming what went wrong (prefixed with the rank when there are several), and the exit status."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    print(f"{rank}{kind}: {error}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(interrupted())
