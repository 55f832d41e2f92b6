"""SLURM templates: host lists, and the per-node commands of a fake 2-node allocation (no SLURM needed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from acomp.train.slurm import allocation_from_env, expand_hostlist

REPO = Path(__file__).resolve().parents[2]


def test_expand_hostlist():
    assert expand_hostlist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_hostlist("node[8-10]-ib") == ["node8-ib", "node9-ib", "node10-ib"]
    assert expand_hostlist("a[1-2]b[3-4]") == ["a1b3", "a1b4", "a2b3", "a2b4"]
    assert expand_hostlist("single") == ["single"]


def test_allocation_from_env():
    alloc = allocation_from_env(
        {"SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_PER_NODE": "h100:4"}
    )
    assert (alloc.nodes, alloc.gpus_per_node, alloc.master_addr, alloc.master_port) == (
        ["n1", "n2"],
        4,
        "n1",
        20123,
    )
    assert alloc.world_size == 8
    with pytest.raises(SystemExit, match="SLURM_NNODES=3"):
        allocation_from_env({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "3"})
    cpu_only = {"SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_PER_NODE": "0", "SLURM_NTASKS_PER_NODE": "2"}
    assert allocation_from_env(cpu_only).gpus_per_node == 2  # --gpus-per-node=0: one rank per task


def dry_run(template: str, tmp_path, launcher: str = "srun", extra=()):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))
    }
    env.update(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="2",
        LAUNCHER=launcher,
        LOG_DIR=str(tmp_path),
        PYTHON=sys.executable,
    )
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / template), "--dry-run", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize(
    "template, config", [("train_llama.sbatch", "llama2-7b-6k"), ("train_opt.sbatch", "opt-2.7b-6k")]
)
def test_srun_dry_run_renders_every_rank(template, config, tmp_path):
    out = dry_run(template, tmp_path, extra=["train.max_steps=10"])
    nodes = re.findall(r"^\[node (\d) (\S+)\]$", out, flags=re.M)
    assert nodes == [("0", "gpu07"), ("1", "gpu08")]
    ranks = re.findall(r"^  MASTER_ADDR=gpu07 MASTER_PORT=24242 RANK=(\d) LOCAL_RANK=(\d) WORLD_SIZE=4 "
                       r"LOCAL_WORLD_SIZE=2 (.*)$", out, flags=re.M)  # fmt: skip
    assert [(r, lr) for r, lr, _ in ranks] == [("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")]
    for *_, cmd in ranks:
        assert cmd.endswith(
            f"-u launchers/train.py --config configs/{config}.yaml train.resume=auto train.preempt_exit_code=75 "
            "train.max_steps=10"
        )
    assert "--ntasks-per-node=2" in out and "--kill-on-bad-exit=1" in out
    assert (tmp_path / "hostfile-4242").read_text() == "gpu07 slots=2\ngpu08 slots=2\n"


def test_torchrun_dry_run_renders_one_command_per_node(tmp_path):
    """torchrun runs under $PYTHON (a bare `torchrun` on PATH may be another environment's) and passes SLURM's
    USR1 warning on to the workers."""
    out = dry_run("train_llama.sbatch", tmp_path, launcher="torchrun")
    head = re.escape(f"MASTER_ADDR=gpu07 MASTER_PORT=24242 {sys.executable} -m torch.distributed.run")
    cmds = re.findall(rf"^  {head} --node_rank=(\d) (.*)$", out, flags=re.M)
    assert [n for n, _ in cmds] == ["0", "1"]
    for _, rest in cmds:
        assert rest.startswith(
            "--nnodes=2 --nproc_per_node=2 --master_addr=gpu07 --master_port=24242 "
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 launchers/train.py"
        )


@pytest.mark.parametrize("dry", [True, False])
def test_a_launch_helper_failure_fails_the_job(tmp_path, dry):
    """A bad LAUNCHER or an allocation that does not add up stops the script with the helper's message and
    a non-zero status (it ran nothing and exited 0)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))
    }
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu07", SLURM_GPUS_ON_NODE="2", LOG_DIR=str(tmp_path))
    env.update(PYTHON=sys.executable, LAUNCHER="torchrn")
    command = ["bash", str(REPO / "slurm" / "train_llama.sbatch"), *(["--dry-run"] if dry else [])]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "LAUNCHER='torchrn': choose srun or torchrun" in proc.stderr
    env.update(LAUNCHER="srun", SLURM_NNODES="2")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SLURM_NNODES=2 but the node list 'gpu07' has 1 hosts" in proc.stderr
    assert "srun exited" not in proc.stdout


def test_templates_request_requeue_on_signal():
    for template in ("train_llama.sbatch", "train_opt.sbatch"):
        text = (REPO / "slurm" / template).read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
        assert "#SBATCH --output=logs/%x-%j.out" in text and "#SBATCH --open-mode=append" in text
    common = (REPO / "slurm" / "common.sh").read_text()
    assert "scontrol requeue" in common and "trap 'forward USR1' USR1" in common
