"""Train an AutoCompressor: `python|torchrun|deepspeed|srun launchers/train.py --config X.yaml [key=value ...]`.

Overrides use dotted keys (train.max_steps=20 data.path=DIR); docs/TRAINING.md lists them all.
Exit status 75 means "stopped by a signal after checkpointing": run the same command again to resume.
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
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from acomp.train import EXIT_REQUEUE, Preempted, run

    try:
        out = run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return EXIT_REQUEUE
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
