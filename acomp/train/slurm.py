"""What each node of a SLURM allocation runs: node list -> master address/port, hostfile, per-node commands.

The sbatch templates (slurm/*.sbatch) call this module so that the real launch and `--dry-run` share one
code path, and the dry run works without SLURM from a fake allocation in the environment:

    SLURM_JOB_ID=1 SLURM_JOB_NODELIST='gpu[01-02]' SLURM_GPUS_ON_NODE=8 bash slurm/train_llama.sbatch --dry-run

Launch modes (LAUNCHER in the sbatch environment):
  srun      one task per GPU; each task maps SLURM_PROCID/SLURM_LOCALID to RANK/LOCAL_RANK and execs the
            trainer, so SLURM's signals (USR1 before the time limit, TERM on preemption) reach every rank.
  torchrun  one task per node running torchrun (--nnodes, --node_rank, static rendezvous at MASTER_ADDR).
A DeepSpeed-style hostfile ("host slots=G") is written as well, for `deepspeed --hostfile` users.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

# srun task wrapper: standard torch.distributed variables from SLURM's per-task ones, then the trainer.
TASK_ENV = (
    "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS "
    'LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; exec "$@"'
)


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list -> host names: 'gpu[01-03,07],cpu5' -> gpu01 gpu02 gpu03 gpu07 cpu5."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", item)
        if not match:
            if item:
                hosts.append(item)
            continue
        prefix, ranges, rest = match.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                names = [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                names = [f"{prefix}{part}"]
            for name in names:
                hosts.extend(f"{name}{suffix}" for suffix in expand_hostlist(rest) or [""])
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        current += ch
    items.append(current)
    return [i for i in items if i]


@dataclass
class Allocation:
    job_id: str
    nodes: list[str]
    gpus_per_node: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.gpus_per_node


def allocation_from_env(env: dict | None = None) -> Allocation:
    """Read the allocation SLURM describes in the environment (or a fake one, for dry runs)."""
    env = dict(os.environ if env is None else env)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SystemExit("not inside a SLURM allocation: SLURM_JOB_NODELIST is not set")
    nodes = expand_hostlist(nodelist)
    if env.get("SLURM_NNODES") and int(env["SLURM_NNODES"]) != len(nodes):
        raise SystemExit(
            f"SLURM_NNODES={env['SLURM_NNODES']} but the node list {nodelist!r} has {len(nodes)} hosts"
        )
    job_id = env.get("SLURM_JOB_ID", "0")
    port = int(env.get("MASTER_PORT") or 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000)
    return Allocation(
        job_id=job_id,
        nodes=nodes,
        gpus_per_node=gpus_per_node(env),
        master_addr=env.get("MASTER_ADDR") or nodes[0],
        master_port=port,
    )


def gpus_per_node(env: dict) -> int:
    """GPUs per node from GPUS_PER_NODE, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE ('h100:8') or tasks per node
    (a CPU-only allocation, `--gpus-per-node=0`: one rank per task)."""
    for key in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(key)
        if value:
            digits = re.findall(r"\d+", value.split("(")[0])
            if digits and int(digits[-1]) > 0:
                return int(digits[-1])
    return 1


def write_hostfile(alloc: Allocation, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{host} slots={alloc.gpus_per_node}\n" for host in alloc.nodes))
    return path


def srun_command(alloc: Allocation, mode: str, train: list[str]) -> list[str]:
    """The one srun command the batch script runs (every node's tasks come from it)."""
    common = ["srun", "--kill-on-bad-exit=1", f"--nodes={len(alloc.nodes)}", "--export=ALL"]
    if mode == "srun":
        return [*common, f"--ntasks-per-node={alloc.gpus_per_node}", "bash", "-c", TASK_ENV, "_", *train]
    if mode == "torchrun":
        python, script = _split_python(train)
        task = 'python=$1; shift; exec "$python" -m torch.distributed.run --node_rank=$SLURM_NODEID "$@"'
        return [
            *common,
            "--ntasks-per-node=1",
            "bash",
            "-c",
            task,
            "_",
            python,
            *torchrun_args(alloc),
            *script,
        ]
    raise SystemExit(f"LAUNCHER={mode!r}: choose srun or torchrun")


def torchrun_args(alloc: Allocation) -> list[str]:
    """torchrun's arguments; it passes SLURM's USR1 warning on to the workers (by default it would die of it,
    leaving them to be killed without a checkpoint)."""
    return [
        f"--nnodes={len(alloc.nodes)}",
        f"--nproc_per_node={alloc.gpus_per_node}",
        f"--master_addr={alloc.master_addr}",
        f"--master_port={alloc.master_port}",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    ]


def _split_python(train: list[str]) -> tuple[str, list[str]]:
    """`python -u launchers/train.py ...` -> ("python", ["launchers/train.py", ...]): the trainer command's
    Python ($PYTHON) runs torchrun too (a bare `torchrun` may be another environment's), which runs the
    script itself."""
    python = train[0] if train and Path(train[0]).name.startswith("python") else "python"
    args = list(train)
    while args and (Path(args[0]).name.startswith("python") or args[0] == "-u"):
        args.pop(0)
    return python, args


def node_commands(alloc: Allocation, mode: str, train: list[str]) -> list[tuple[str, list[str]]]:
    """(host, commands) per node: exactly what srun starts there, with SLURM's per-task values filled in."""
    common = f"MASTER_ADDR={alloc.master_addr} MASTER_PORT={alloc.master_port}"
    plan = []
    for node_rank, host in enumerate(alloc.nodes):
        if mode == "srun":
            cmds = [
                f"{common} RANK={node_rank * alloc.gpus_per_node + local} LOCAL_RANK={local} "
                f"WORLD_SIZE={alloc.world_size} LOCAL_WORLD_SIZE={alloc.gpus_per_node} {shlex.join(train)}"
                for local in range(alloc.gpus_per_node)
            ]
        else:
            python, script = _split_python(train)
            cmd = [
                python,
                "-m",
                "torch.distributed.run",
                f"--node_rank={node_rank}",
                *torchrun_args(alloc),
                *script,
            ]
            cmds = [f"{common} {shlex.join(cmd)}"]
        plan.append((host, cmds))
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SLURM launch helper for the sbatch templates")
    parser.add_argument("action", choices=["env", "srun", "dry-run"])
    parser.add_argument("--launcher", default=os.environ.get("LAUNCHER", "srun"))
    parser.add_argument("--hostfile", default=None, help="where to write the hostfile (env action)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    train = argv[split + 1 :]  # the trainer command, after "--"
    alloc = allocation_from_env()
    if args.action == "env":
        hostfile = args.hostfile or f"logs/hostfile-{alloc.job_id}"
        write_hostfile(alloc, hostfile)
        for key, value in {
            "MASTER_ADDR": alloc.master_addr,
            "MASTER_PORT": alloc.master_port,
            "NNODES": len(alloc.nodes),
            "GPUS_PER_NODE": alloc.gpus_per_node,
            "HOSTFILE": hostfile,
        }.items():
            print(f"export {key}={shlex.quote(str(value))}")
    elif args.action == "srun":
        sys.stdout.write("\0".join(srun_command(alloc, args.launcher, train)) + "\0")
    else:
        print(
            f"# job {alloc.job_id}: {len(alloc.nodes)} nodes x {alloc.gpus_per_node} GPUs, launcher {args.launcher}"
        )
        print(f"# srun: {shlex.join(srun_command(alloc, args.launcher, train))}")
        for node_rank, (host, cmds) in enumerate(node_commands(alloc, args.launcher, train)):
            print(f"[node {node_rank} {host}]")
            for cmd in cmds:
                print(f"  {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
