"""A real single-node Slurm cluster on this machine, for tests: Debian's slurmctld + slurmd + munge,
two fake GPUs, state and logs under one temporary folder.

The configuration goes to /etc/slurm (Snakemake's job-step plugin drops SLURM_CONF before its
inner `srun`, so only the default path works); a slurm.conf found there that this module did not
write is never overwritten.

Needs root and the packages `slurmctld slurmd slurm-client munge` (installed by
tools/test-packages.sh when missing). `unavailable_reason()` says why a cluster cannot be started, or None.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

INSTALLER = Path(__file__).resolve().parents[2] / "tools/test-packages.sh"  # as `make test` runs it
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
CONF_DIR = Path("/etc/slurm")
MARKER = "# written by entroflow tests/slurm/cluster.py"


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def unavailable_reason(install: bool = True) -> str | None:
    """None when a cluster can be started here, else why not (after trying tools/test-packages.sh if allowed)."""
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs jobs as their user)"
    if _missing_binaries() and install:  # e.g. pytest run without `make test`
        subprocess.run(["bash", str(INSTALLER)], capture_output=True)
    missing = _missing_binaries()
    if missing:
        return f"Slurm/munge binaries not found ({', '.join(missing)}) and {INSTALLER.name} could not install them"
    conf = CONF_DIR / "slurm.conf"
    if conf.exists() and MARKER not in conf.read_text():
        return f"{conf} belongs to another Slurm setup; not overwriting it"
    return None


def _node_line() -> str:
    """NodeName line with this machine's CPUs and ~90% of its memory, from `slurmd -C`."""
    probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(f.split("=", 1) for f in probe.split("\n")[0].split() if "=" in f)
    memory = int(int(fields["RealMemory"]) * 0.9)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    spec = " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
    return (
        f"NodeName=localnode NodeAddr=127.0.0.1 {spec} RealMemory={memory} Gres=gpu:2 State=UNKNOWN"
    )


class LocalSlurm:
    """`with LocalSlurm(folder) as cluster:` starts munged (if not running), slurmctld, slurmd;
    leaving the block stops what was started and removes the configuration it wrote."""

    def __init__(self, folder: Path, n_gpus: int = 2):
        self.folder = Path(folder)
        self.n_gpus = n_gpus
        self.procs: list[subprocess.Popen] = []
        self.conf = CONF_DIR / "slurm.conf"

    def _write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "log", "gpu"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        gres = ["AutoDetect=off"]
        for i in range(self.n_gpus):
            device = f / "gpu" / f"nvidia{i}"  # a GPU without File= is dropped and drains the node
            if not device.exists():
                device.symlink_to("/dev/null")
            gres.append(f"NodeName=localnode Name=gpu File={device}")
        CONF_DIR.mkdir(parents=True, exist_ok=True)
        (CONF_DIR / "gres.conf").write_text("\n".join([MARKER, *gres]) + "\n")
        host = socket.gethostname()
        self.conf.write_text(
            "\n".join(
                [
                    MARKER,
                    "ClusterName=entroflow-test",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmctldPort=46817",
                    "SlurmdPort=46818",
                    "AuthType=auth/munge",
                    f"StateSaveLocation={f / 'state'}",
                    f"SlurmdSpoolDir={f / 'spool'}",
                    f"SlurmctldPidFile={f / 'slurmctld.pid'}",
                    f"SlurmdPidFile={f / 'slurmd.pid'}",
                    f"SlurmctldLogFile={f / 'log/slurmctld.log'}",
                    f"SlurmdLogFile={f / 'log/slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "DefMemPerCPU=1024",
                    "MinJobAge=7200",  # keep finished jobs in scontrol for the assertions
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/none",
                    "MailProg=/bin/true",
                    "GresTypes=gpu",
                    "SchedulerParameters=sched_interval=1",
                    _node_line(),
                    "PartitionName=main Nodes=localnode Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )

    def _start_munge(self) -> None:
        if MUNGE_SOCKET.exists() and subprocess.run(["pgrep", "-x", "munged"]).returncode == 0:
            return
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
        munged = shutil.which("munged") or "/usr/sbin/munged"
        subprocess.run(["runuser", "-u", "munge", "--", munged, "--force"], check=True)
        self.started_munge = True

    def start(self, timeout: float = 60) -> LocalSlurm:
        self.started_munge = False
        self._write_config()
        self._start_munge()
        for daemon in ("slurmctld", "slurmd"):
            cmd = [shutil.which(daemon) or f"/usr/sbin/{daemon}", "-D", "-f", str(self.conf)]
            if daemon == "slurmctld":
                cmd.append("-c")  # fresh state: no jobs from an earlier test session
            else:
                cmd += ["-N", "localnode"]  # the node is not named after the host
            log = open(self.folder / "log" / f"{daemon}.out", "w")  # noqa: SIM115
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.scontrol("show", "node", "localnode", check=False)
            if "State=IDLE" in state:
                return self
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        logs = "\n".join(
            (self.folder / "log" / n).read_text()[-2000:]
            for n in ("slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log")
            if (self.folder / "log" / n).exists()
        )
        self.stop()
        raise RuntimeError(f"the local Slurm cluster did not come up:\n{logs}")

    def scontrol(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["scontrol", *args], capture_output=True, text=True, check=check)
        return result.stdout + result.stderr

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller still knows (finished ones included), as key -> value."""
        text = self.scontrol("show", "job", "--oneliner", check=False)
        jobs = []
        for line in text.splitlines():
            if line.startswith("JobId="):
                jobs.append(dict(f.split("=", 1) for f in line.split() if "=" in f))
        return jobs

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []
        for name in ("slurm.conf", "gres.conf"):
            conf = CONF_DIR / name
            if conf.exists() and MARKER in conf.read_text():
                conf.unlink()
        if getattr(self, "started_munge", False):
            subprocess.run(["pkill", "-x", "munged"])
            self.started_munge = False

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
