"""The sandbox's launcher: runs as the first process of a sandboxed execution, sets the jail up, then
exec()s the program. Standard library only; started as ``python -I -S _sandbox_child.py <json>``.

Order matters: everything that needs root (namespaces, mounts, chown) happens before the
privileges are dropped; the resource limits are set before too, as hard limits the program can
only lower. The outcome of each step is written to the status pipe (closed by exec) so that the
parent can tell a failed setup from a failing program; the program cannot fake it.
"""
import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x20000000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
# directories an unprivileged user can write to on a usual Linux system: each gets a private tmpfs
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
PR_SET_PDEATHSIG, SIGKILL = 1, 9


def _die_with_parent(libc) -> None:
    """SIGKILL this process when its parent exits (a killed evaluator, a killed launcher): a
    sleeping program uses no CPU time, so RLIMIT_CPU alone would let it live on for ever."""
    if libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _exit_like(wstatus: int) -> None:
    if os.WIFSIGNALED(wstatus):
        os._exit(128 + os.WTERMSIG(wstatus))
    os._exit(os.waitstatus_to_exitcode(wstatus))


def _enter_pid_namespace(status, libc) -> None:
    """After unshare(CLONE_NEWPID) the next child is the namespace's pid 1: fork it and make this
    process wait for it and exit with its status."""
    pid = os.fork()
    if pid == 0:
        # the kernel kills everything in the namespace when its init dies; init dies with us
        # (its parent is outside the namespace, so getppid() cannot confirm it: this process
        # only waits for it, and a parent-death signal of its own ends it no earlier)
        _die_with_parent(libc)
        return
    status.close()
    _, wstatus = os.waitpid(pid, 0)
    _exit_like(wstatus)


def _init_and_fork(status) -> None:
    """In pid 1: fork the program's process; reap every child until the program has exited."""
    pid = os.fork()
    if pid == 0:
        return
    status.close()
    while True:
        try:
            child, wstatus = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(121)
        if child == pid:
            _exit_like(wstatus)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status = os.fdopen(cfg["status_fd"], "w")
    report = {}
    try:
        with open(cfg["program"], "rb") as f:
            program = f.read()
        libc = ctypes.CDLL(None, use_errno=True)
        # with the evaluator: kept across exec (no setuid binary), dropped by setuid (root: then
        # the namespace's init, which keeps it, takes the program with it)
        _die_with_parent(libc)
        if os.getppid() != cfg["parent_pid"]:
            raise OSError("the evaluator exited before the sandbox started")
        root = os.geteuid() == 0
        uid, gid = cfg["uid"], cfg["gid"]

        # 1. network namespace (and mount + PID namespaces when root)
        flags = CLONE_NEWNET | (CLONE_NEWNS | CLONE_NEWPID if root else CLONE_NEWUSER)
        report["network_isolated"] = libc.unshare(flags) == 0
        report["private_tmp"] = report["pid_namespace"] = False
        workdir = os.getcwd()
        if root and report["network_isolated"]:
            _enter_pid_namespace(status, libc)     # returns in the namespace's init (pid 1)
            report["pid_namespace"] = True
            # 2. private world-writable directories; the work dir is a fresh tmpfs of its own
            if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                raise OSError(ctypes.get_errno(), "making / private in the new mount namespace failed")
            size = f"size={cfg['tmpfs_mb']}m,mode=1777".encode()
            for d in WORLD_WRITABLE:
                if os.path.isdir(d) and not os.path.islink(d):
                    if libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, size) != 0:
                        raise OSError(ctypes.get_errno(), f"mounting a tmpfs on {d} failed")
            # a /proc of the new PID namespace: the program sees only its own processes
            if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
                raise OSError(ctypes.get_errno(), "mounting /proc failed")
            workdir = "/tmp/work"
            os.mkdir(workdir, 0o700)
            report["private_tmp"] = True
        path = os.path.join(workdir, "program.py")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(program)
        if root:
            os.chown(workdir, uid, gid)
            os.chown(path, uid, gid)
        os.chdir(workdir)

        # 3. resource limits (hard = soft: the program cannot raise them; CPU: SIGXCPU at the soft
        #    limit, SIGKILL one second later)
        lim = cfg["limits"]
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
        for name, value in (("RLIMIT_AS", lim["memory_mb"] << 20),
                            ("RLIMIT_FSIZE", lim["file_mb"] << 20), ("RLIMIT_NPROC", lim["nproc"]),
                            ("RLIMIT_NOFILE", lim["nofile"]), ("RLIMIT_CORE", 0)):
            resource.setrlimit(getattr(resource, name), (value, value))

        # 4. the program runs in a child of the namespace's init, which reaps every orphan (no
        #    zombies are left) and exits with the program's status; then the kernel kills whatever
        #    else is left in the namespace
        if report["pid_namespace"]:
            _init_and_fork(status)
        # 5. drop to the run's own unprivileged uid/gid (no supplementary groups)
        if root:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            if os.geteuid() == 0 or os.getegid() == 0:
                raise OSError("could not drop root privileges")
        report["uid"] = os.getuid()
        report["ok"] = True
        status.write(json.dumps(report))
        status.flush()
        os.set_inheritable(status.fileno(), False)
        os.execve(cfg["python"], [cfg["python"], "-s", "program.py"], cfg["env"])
    except BaseException as e:  # noqa: BLE001 -- any failure is a setup failure the parent must see
        report.update(ok=False, error=f"{type(e).__name__}: {e}")
        status.write("\n" + json.dumps(report))
        status.flush()
        os._exit(121)


if __name__ == "__main__":
    main()
