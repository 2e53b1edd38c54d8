"""Who may write into a save_dir, and when the ranks of a run stop on their own.

Policy (what DeepSpeed / Megatron-LM users expect of a checkpoint folder):

- A save_dir that holds another run (a `latest`, step folders, metrics.jsonl,
  schedule_search.jsonl or TensorBoard events) is refused, unless `checkpoint.resume=true`
  (continue it) or `checkpoint.overwrite=true` (delete that run's checkpoints, metrics and events
  first; nothing else in the folder is touched). Forgetting `resume` can no longer replace a run.
- What the run wrote is on record: SAVE/checkpoints.json lists the step folders its saves
  completed. Pruning (checkpoint.keep_last) and overwrite delete only folders named there with
  the exact `step_%07d` name, never a user's `step_0000003_keep/` or `step_backup/`. A save_dir
  from before the record counts its exact `step_%07d` folders as the run's. A folder with a
  step name that the record does not list is refused (a save would replace it): move it away.
- One run at a time: global rank 0 holds SAVE/run.lock (pid, host, Slurm job id) while it runs.
  A second run on the same save_dir is refused while the holder lives. A lock is stale, and
  taken over, when its pid is dead on this host, when it belongs to an earlier incarnation of
  this Slurm job (a requeue), or when its holder, on another host, has not refreshed it for
  `STALE_AFTER_S` (the holder touches it every `HEARTBEAT_S`).
- Ranks exit when their launcher dies: a `kill -9` of the `deepspeed` runner leaves its
  per-node launcher and the ranks running as orphans that keep writing checkpoints. A
  watchdog thread in every rank started by a launcher (LOCAL_RANK set) notices that its parent
  (and, under deepspeed's per-node launcher, the runner above it) is gone and ends the process
  like the kill the user meant; the last complete checkpoint stays `latest`. A run started by
  hand (plain `python`, possibly under nohup) does not watch its shell.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from megablock.config import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
WATCH_INTERVAL_S = 2.0
# What a training run writes at the top of its save_dir (megablock.training.checkpointing,
# megablock.training.metrics); step folders are matched by prefix.
RECORD_FILE = "checkpoints.json"
RUN_ENTRIES = ("latest", "latest.tmp", "metrics.jsonl", "schedule_search.jsonl", "tensorboard", RECORD_FILE,
               RECORD_FILE + ".tmp")
STEP_PREFIX = "step_"
STEP_NAME = re.compile(r"step_\d{7}")  # checkpointing.step_dir_name; also ".tmp" while a save is written
RESTARTED_LOGS = ("metrics.jsonl", "schedule_search.jsonl")  # per-step records a run from step 0 rewrites


# ----------------------------------------------------------------------------- lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """SAVE/run.lock held by this process; released at exit (atexit) or by `release()`."""

    def __init__(self, path: Path, holder: dict):
        self.path = path
        self.holder = holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    @staticmethod
    def me() -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "started": time.time(), "command": " ".join(sys.argv)[:500]}

    @classmethod
    def acquire(cls, save_dir) -> "RunLock":
        path = Path(save_dir) / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        me = cls.me()
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(path)
                if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    return cls(path, holder)  # this process already holds it (a second Trainer)
                reason = stale_reason(path, holder)
                if reason is None:
                    raise ConfigError(describe_holder(path, holder)) from None
                logger.warning("taking over the stale lock %s (%s)", path, reason)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass  # another starting run removed it first; O_EXCL decides who gets it
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            return cls(path, me)
        raise ConfigError(f"could not take {path}: other runs keep creating it; is a second run starting?")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if read_lock(self.path) != self.holder:
                    logger.warning("%s no longer names this run (deleted by hand?); two runs may now share "
                                   "the save_dir", self.path)
                    return
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            if read_lock(self.path) == self.holder:  # never remove a lock another run took over
                os.remove(self.path)
        except OSError:
            pass


def read_lock(path: Path) -> Optional[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stale_reason(path: Path, holder: Optional[dict]) -> Optional[str]:
    """Why the lock at `path` no longer protects a live run, or None if it may."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return "it is gone"
    if holder is None:
        # Empty or unreadable: either a run is writing it this instant or one died doing so.
        return "unreadable and not refreshed for %.0f s" % age if age > 10 else None
    host, pid = holder.get("host"), holder.get("pid")
    job = os.environ.get("SLURM_JOB_ID")
    if host == socket.gethostname():
        if not isinstance(pid, int) or not _pid_alive(pid):
            return f"pid {pid} on this host has exited"
        return None
    if job and holder.get("slurm_job_id") == job:
        return f"it was taken by an earlier run of Slurm job {job} on {host} (requeued)"
    if age > STALE_AFTER_S:
        return f"its holder on {host} has not refreshed it for {age:.0f} s"
    return None


def describe_holder(path: Path, holder: Optional[dict]) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')}"
           + (f" (Slurm job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else "")) if holder else "a run that is starting"
    return (f"checkpoint.save_dir={path.parent} is in use by another run ({who}, lock {path}): two runs on one "
            f"save_dir would interleave checkpoints and metrics. Wait for it to finish, stop it, or choose "
            f"another checkpoint.save_dir; if that run is certainly gone (e.g. killed on another machine), "
            f"delete {path}")


# ----------------------------------------------------------------------------- record
def is_step_name(name: str) -> bool:
    return STEP_NAME.fullmatch(name.removesuffix(".tmp")) is not None


def read_record(save_dir) -> list[str] | None:
    """The step folders the run in `save_dir` completed (SAVE/checkpoints.json), or None when
    there is no record (an empty save_dir, or one written before the record existed)."""
    path = Path(save_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text())["checkpoints"]
        if not all(isinstance(n, str) for n in names):
            raise TypeError("not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is damaged ({type(e).__name__}: {e}); it lists the checkpoints the run in "
                          f"{save_dir} wrote. Restore it, or delete it to count every step_NNNNNNN folder there "
                          f"as the run's") from None
    return [n for n in names if STEP_NAME.fullmatch(n)]


def write_record(save_dir, names) -> None:
    """Replace the record atomically (a kill leaves the old or the new list)."""
    path = Path(save_dir) / RECORD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"checkpoints": sorted(set(names))}, indent=1) + "\n")
    os.replace(tmp, path)


def run_checkpoints(save_dir) -> list[str]:
    """The run's own step folders that exist in `save_dir` (oldest first): those on record, or,
    without a record, every folder with an exact step name."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    record = read_record(root)
    if record is None:
        return sorted(p.name for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir())
    return sorted(n for n in record if (root / n).is_dir())


def record_checkpoint(save_dir, name: str) -> None:
    """After a save completed step folder `name` (rank 0): add it to the record. A save_dir from
    before the record adopts its exact-name step folders first."""
    write_record(save_dir, [*run_checkpoints(save_dir), name])


def prune_checkpoints(save_dir, keep_last: int, keep: str) -> None:
    """Delete the run's oldest checkpoints beyond `keep_last` (never `keep`, never a folder that
    is not on record)."""
    steps = run_checkpoints(save_dir)
    doomed = [n for n in steps[: max(0, len(steps) - keep_last)] if n != keep]
    for name in doomed:
        shutil.rmtree(Path(save_dir) / name, ignore_errors=True)
    write_record(save_dir, [n for n in steps if n not in doomed])


def foreign_step_folders(save_dir) -> list[str]:
    """Folders with a step name (or a step-like prefix) that the run's record does not list."""
    root = Path(save_dir)
    record = read_record(root) if root.is_dir() else None
    if record is None:
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and STEP_NAME.fullmatch(p.name) and p.name not in record)


# ----------------------------------------------------------------------------- policy
def previous_run(save_dir) -> list[str]:
    """Names of what an earlier run left in `save_dir` (empty when it holds no run): the run's own
    files and its step folders (exact `step_%07d` names; `step_backup/` is not a run)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.iterdir()):
        if p.name in RUN_ENTRIES or (is_step_name(p.name) and p.is_dir()):
            if p.name in RESTARTED_LOGS and p.stat().st_size == 0:
                continue
            found.append(p.name)
    return found


def check_save_dir_policy(save_dir, resume: bool, overwrite: bool) -> None:
    """Refuse, or clear with `overwrite`, a save_dir that holds another run (rank 0 only)."""
    if resume and overwrite:
        raise ConfigError("checkpoint.resume=true and checkpoint.overwrite=true contradict each other: "
                          "set resume to continue the run in checkpoint.save_dir, or overwrite to replace it")
    found = previous_run(save_dir)
    root = Path(save_dir)
    foreign = foreign_step_folders(root)
    if foreign and (resume or overwrite):
        raise ConfigError(
            f"checkpoint.save_dir={save_dir} holds {', '.join(foreign[:6])}, named like this run's checkpoints but "
            f"not among those it wrote ({root / RECORD_FILE}); a save of that step would replace it. Move or "
            f"rename it (e.g. {foreign[0]}_keep), or choose another checkpoint.save_dir"
        )
    if resume and found and not (root / "latest").is_file():
        # The previous run was killed before its first checkpoint: this one starts at step 0,
        # so none of the logged steps or searches survive (they would be listed twice).
        for name in RESTARTED_LOGS:
            if (root / name).is_file():
                logger.info("checkpoint.resume: %s has no checkpoint yet; restarting its %s", save_dir, name)
                (root / name).unlink()
    if not found or resume:
        return
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    if not overwrite:
        raise ConfigError(
            f"checkpoint.save_dir={save_dir} already holds a run ({shown}"
            + (f"; latest is {latest}" if latest else "") + "): set checkpoint.resume=true to continue it, "
            "checkpoint.overwrite=true to delete it and start over, or choose another checkpoint.save_dir"
        )
    # The run's checkpoints (before the record goes), then its files; partial saves (.tmp) are its own.
    doomed = [*run_checkpoints(root), *(n for n in found if n.endswith(".tmp") and is_step_name(n))]
    doomed += [n for n in found if n in RUN_ENTRIES and n != RECORD_FILE] + [n for n in found if n == RECORD_FILE]
    logger.warning("checkpoint.overwrite: deleting the previous run in %s (%s)", save_dir, ", ".join(doomed))
    for name in doomed:
        p = root / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# ----------------------------------------------------------------------------- launcher watchdog
def _proc_ppid(pid: int) -> Optional[int]:
    """Parent pid of `pid` from /proc (Linux); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may contain spaces and parentheses; split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_links() -> list[tuple[int, int]]:
    """(child, parent) pairs whose link must hold for this rank to go on: itself -> its launcher,
    and, under deepspeed's per-node launcher, that launcher -> the `deepspeed` runner. Empty for a
    process not started by a launcher (no LOCAL_RANK)."""
    if "LOCAL_RANK" not in os.environ:
        return []
    me, parent = os.getpid(), os.getppid()
    if parent <= 1:
        return []
    links = [(me, parent)]
    if "deepspeed.launcher.launch" in _proc_cmdline(parent):
        runner = _proc_ppid(parent)
        if runner is not None and runner > 1:
            links.append((parent, runner))
    return links


def _link_broken(child: int, parent: int) -> bool:
    if child == os.getpid():
        return os.getppid() != parent  # reparented: the launcher is gone (immune to pid reuse)
    ppid = _proc_ppid(child)
    return ppid is None or ppid != parent


_watchdog: Optional[threading.Thread] = None


def watch_launcher(links: Optional[list] = None, interval: float = WATCH_INTERVAL_S, on_orphan=None) -> Optional[threading.Thread]:
    """Start (once per process) a daemon thread that ends this process when a link breaks."""
    global _watchdog
    links = launcher_links() if links is None else links
    if not links or (_watchdog is not None and _watchdog.is_alive()):
        return _watchdog

    def orphaned():
        sys.stderr.write(f"megablock: launcher gone (links {links} broken); rank pid {os.getpid()} exits; "
                         "the last complete checkpoint stays 'latest'\n")
        sys.stderr.flush()
        for lock in _held_locks:
            lock.release()
        os._exit(1)  # like the kill the user meant: no collective could finish without the others

    def run():
        while True:
            time.sleep(interval)
            if any(_link_broken(c, p) for c, p in links):
                (on_orphan or orphaned)()
                return

    _watchdog = threading.Thread(target=run, name="launcher-watchdog", daemon=True)
    _watchdog.start()
    return _watchdog


_held_locks: list[RunLock] = []


# ----------------------------------------------------------------------------- entry
def claim_save_dir(cfg, info) -> Optional[RunLock]:
    """Collective, at the start of a run: start the launcher watchdog, then (global rank 0) take
    the save_dir lock and apply the save_dir policy; every rank raises the same ConfigError."""
    import torch.distributed as dist

    watch_launcher()
    save_dir = cfg.checkpoint.save_dir
    if save_dir is None:
        return None
    error, lock = None, None
    if info.rank == 0:
        try:
            lock = RunLock.acquire(save_dir)
            check_save_dir_policy(save_dir, cfg.checkpoint.resume, cfg.checkpoint.overwrite)
        except ConfigError as e:
            error = str(e)
            if lock is not None:
                lock.release()
                lock = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ConfigError(error)
    if lock is not None:
        _held_locks.append(lock)
    return lock
