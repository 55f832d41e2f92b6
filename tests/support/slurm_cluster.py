"""A private one-node SLURM cluster for the tests: Debian's slurm-wlm (munged, slurmctld, slurmd) started as
root in a temporary directory with its own config, munge socket and ports, and stopped by pid afterwards.

No cgroups and no systemd (a container has neither): processes are tracked through /proc
(proctrack/linuxproc), tasks are not bound (task/none), no accounting. The node gets the machine's CPUs
and no GPUs. `unavailable()` says why a cluster cannot be started here (not root, slurm-wlm not installed);
`start_cluster` raises ClusterUnavailable with the daemons' logs when they do not come up.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from acomp.train.distributed import free_port

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")
# How long a requeued job waits before it may start again (AuthInfo cred_expire; slurm's default, 120 s, would
# dominate the test), and how often the scheduler looks at pending jobs (default 60 s).
REQUEUE_WAIT_S = 5
SCHED_INTERVAL_S = 2


class ClusterUnavailable(RuntimeError):
    """The daemons could not be started here; the message says why (with their logs)."""


def unavailable() -> str | None:
    """Why no cluster can be started on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as their user)"
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"slurm-wlm is not installed ({', '.join(missing)} missing: apt-get install slurm-wlm)"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class Cluster:
    root: Path
    conf: Path
    node: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict:
        """The environment of a client command (sbatch, scontrol, ...): this cluster's config."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *args: str, timeout: float = 30, check: bool = True, **kwargs):
        env = {**self.env, **kwargs.pop("env", {})}
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...); {} once the job is gone."""
        proc = self.command("scontrol", "-o", "show", "job", job_id, check=False)
        if proc.returncode != 0:
            return {}
        return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)

    def logs(self, chars: int = 3000) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            text = path.read_text(errors="replace")[-chars:] if path.is_file() else "(none)"
            parts.append(f"--- {name}\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this cluster started (by pid), slurmd first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.command("scancel", "--full", "--user=root", check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def slurm_conf(root: Path, node: str, cpus: int) -> str:
    return f"""\
ClusterName=acomptest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={REQUEUE_WAIT_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval={SCHED_INTERVAL_S}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=600
KillWait=30
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(root: Path, timeout: float = 60) -> Cluster:
    """munged, slurmctld and slurmd under `root`, the node idle; ClusterUnavailable (daemons stopped)
    when they are not up within `timeout` seconds."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node, os.cpu_count() or 1))
    cluster = Cluster(root, conf, node)
    key = root / "munge" / "munge.key"
    subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
    logs = {}
    try:
        for name, args in (
            (
                "munged",
                [
                    _which("munged"), "--foreground", "--force", f"--socket={root}/munge/munge.socket",
                    f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
                    f"--log-file={root}/munged.log", f"--seed-file={root}/munge/munged.seed",
                ],
            ),
            ("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)]),
            ("slurmd", [_which("slurmd"), "-D", "-f", str(conf), "-N", node]),
        ):  # fmt: skip
            logs[name] = open(root / f"{name}.out", "w")
            cluster.procs[name] = subprocess.Popen(
                args, env=cluster.env, stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True
            )
            if name == "munged":
                _wait(lambda: (root / "munge" / "munge.socket").exists(), cluster, timeout, "munged's socket")
        _wait(lambda: "State=IDLE" in _node_state(cluster), cluster, timeout, "the node to be idle")
    except ClusterUnavailable:
        cluster.stop()
        raise
    return cluster


def _node_state(cluster: Cluster) -> str:
    proc = cluster.command("scontrol", "-o", "show", "node", cluster.node, check=False, timeout=10)
    return proc.stdout if proc.returncode == 0 else ""


def _wait(predicate, cluster: Cluster, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                out = (cluster.root / f"{name}.out").read_text(errors="replace")[-2000:]
                raise ClusterUnavailable(
                    f"{name} exited {proc.returncode} while waiting for {what}:\n{out}\n{cluster.logs()}"
                )
        time.sleep(0.2)
    raise ClusterUnavailable(f"timed out after {timeout}s waiting for {what}:\n{cluster.logs()}")
