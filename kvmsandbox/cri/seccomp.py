"""A CRI container's seccomp setting as the OCI ``linux.seccomp`` object that crun (libseccomp)
loads in the guest: the RuntimeDefault profile (an allowlist after moby's and containerd's default:
other syscalls fail with EPERM, capability-gated ones are allowed only with the capability), or a
profile in the Docker/containerd format (or OCI-shaped) from a Localhost path or raw JSON. The
Docker format's ``includes``/``excludes`` and ``archMap`` are resolved for the guest (x86_64, Linux
6.1) and the container's capabilities, so the result holds only OCI keys. Unconfined (or no profile)
means no ``linux.seccomp``, and so does privileged, as with containerd: the caller decides that.

Every profile is checked before it leaves for the guest (size, actions, operators, flags,
architectures, syscall names, argument indexes and values, counts); a violation is
:class:`SeccompError`, an ``InvalidArgument`` naming the profile and the field. SCMP_ACT_NOTIFY is
refused: no listener would take the notify fd.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from kvmsandbox.errors import InvalidArgument

MAX_PROFILE_BYTES = 1 << 20
MAX_RULES = 4096
MAX_NAMES = 1024  # per rule
MAX_ARGS = 16  # per rule: six arguments, a few compared more than once
MAX_FILTER_ITEMS = 64  # caps or arches of one includes/excludes
MAX_PATH = 4096
GUEST_KERNEL = (6, 1, 0)
MAX_ERRNO = 4095


def _words(text: str, prefix: str = "") -> frozenset[str]:
    return frozenset(prefix + word for word in text.split())


ACTIONS = _words(
    "SCMP_ACT_KILL SCMP_ACT_KILL_PROCESS SCMP_ACT_KILL_THREAD SCMP_ACT_TRAP SCMP_ACT_ERRNO SCMP_ACT_TRACE "
    "SCMP_ACT_ALLOW SCMP_ACT_LOG"
)
OPS = _words("SCMP_CMP_NE SCMP_CMP_LT SCMP_CMP_LE SCMP_CMP_EQ SCMP_CMP_GE SCMP_CMP_GT SCMP_CMP_MASKED_EQ")
FLAGS = _words("SECCOMP_FILTER_FLAG_TSYNC SECCOMP_FILTER_FLAG_LOG SECCOMP_FILTER_FLAG_SPEC_ALLOW")
ARCHITECTURES = _words(
    "X86 X86_64 X32 ARM AARCH64 MIPS MIPS64 MIPS64N32 MIPSEL MIPSEL64 MIPSEL64N32 PPC PPC64 PPC64LE S390 S390X "
    "PARISC PARISC64 RISCV64",
    prefix="SCMP_ARCH_",
)
GUEST_ARCH = "SCMP_ARCH_X86_64"
GUEST_ARCHITECTURES = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
# How the guest's architecture is spelled in ``includes.arches``/``excludes.arches`` (Go's GOARCH).
GUEST_ARCH_NAMES = frozenset({"amd64", "x86_64"})

_SYSCALL_NAME = re.compile(r"[a-z0-9_]{1,64}")
_CAP_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_ARCH_NAME = re.compile(r"[a-z0-9_]{1,32}")
_KERNEL = re.compile(r"(\d{1,4})\.(\d{1,4})(?:\.(\d{1,6}))?")
_ERRNO_ACTIONS = frozenset({"SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"})

# RuntimeDefault: allowed for every container. Syscall names libseccomp 2.5.4 knows (Linux up to
# 5.17); the 32-bit ones serve the x86 and x32 ABIs the filter also covers.
_ALLOWED = """
accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chown32 clock_adjtime clock_adjtime64
clock_getres clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep clock_nanosleep_time64 close
close_range connect copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old
epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit exit_group faccessat
faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir fchmod fchmodat fchown fchown32 fchownat fcntl
fcntl64 fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64
fsync ftruncate ftruncate64 futex futex_time64 futex_waitv futimesat getcpu getcwd getdents getdents64 getegid
getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid
getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid
getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr inotify_add_watch inotify_init
inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy io_getevents io_pgetevents io_pgetevents_time64 ioprio_get
ioprio_set io_setup io_submit    ipc kill landlock_add_rule
landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat listen listxattr llistxattr
_llseek lremovexattr lseek lsetxattr lstat lstat64 madvise membarrier memfd_create memfd_secret mincore mkdir
mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock
munlockall munmap  nanosleep newfstatat _newselect open openat openat2 pause pidfd_open
pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2
prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2 read readahead readlink readlinkat
readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg remap_file_pages removexattr rename renameat renameat2
restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam
sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64
sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop
semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid setfsgid32 setfsuid
setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority setregid setregid32 setresgid
setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit set_robust_list setsid setsockopt set_thread_area
set_tid_address setuid setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4
sigprocmask sigreturn  socketpair splice stat stat64 statfs statfs64 statx symlink symlinkat sync
sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun timer_gettime
timer_gettime64 timer_settime timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime
timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat
utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
"""

# Allowed only to a container that holds the capability (the capability is what the kernel would
# check anyway; the filter keeps the syscall's attack surface away from everyone else).
_BY_CAPABILITY = (
    ("CAP_SYS_ADMIN", "bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie mount"),
    ("CAP_SYS_ADMIN", "mount_setattr move_mount open_tree perf_event_open quotactl quotactl_fd"),
    ("CAP_SYS_ADMIN", "name_to_handle_at setdomainname sethostname setns syslog umount umount2 unshare"),
    ("CAP_DAC_READ_SEARCH", "open_by_handle_at"),
    ("CAP_SYS_BOOT", "reboot"),
    ("CAP_SYS_CHROOT", "chroot"),
    ("CAP_SYS_MODULE", "delete_module init_module finit_module"),
    ("CAP_SYS_PACCT", "acct"),
    ("CAP_SYS_PTRACE", "kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev ptrace"),
    ("CAP_SYS_RAWIO", "iopl ioperm"),
    ("CAP_SYS_TIME", "settimeofday stime clock_settime clock_settime64"),
    ("CAP_SYS_TTY_CONFIG", "vhangup"),
    ("CAP_SYS_NICE", "get_mempolicy mbind set_mempolicy set_mempolicy_home_node"),
    ("CAP_SYSLOG", "syslog"),
    ("CAP_BPF", "bpf"),
    ("CAP_PERFMON", "perf_event_open"),
)

# clone(2) flags that create namespaces: without CAP_SYS_ADMIN, clone may not ask for any of them.
_CLONE_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
# personality(2) values a container may set: PER_LINUX, UNAME26, PER_LINUX32, both, and the query.
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
# Not in the list, unlike older Docker profiles: io_uring (its own socket() reaches AF_VSOCK
# unfiltered, and moby dropped it) and socketcall (its arguments are behind a pointer no filter reads).
_AF_VSOCK = 40  # the guest's vsock is the runtime's own channel to the host: no container sockets


class SeccompError(InvalidArgument):
    """A seccomp profile that cannot be used; the message names the profile and what is wrong."""


def _rule(names: str, action: str = "SCMP_ACT_ALLOW", **extra: Any) -> dict[str, Any]:
    return {"names": names.split(), "action": action, **extra}


def _arg(index: int, value: int, op: str) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": 0, "op": op}


def _default_profile() -> dict[str, Any]:
    """RuntimeDefault in the Docker profile format, conditions unresolved."""
    no_admin = {"caps": ["CAP_SYS_ADMIN"]}
    rules = [
        _rule(_ALLOWED),
        _rule("ptrace process_vm_readv process_vm_writev", includes={"minKernel": "4.8"}),
        _rule("arch_prctl", includes={"arches": ["amd64", "x32"]}),
        _rule("modify_ldt", includes={"arches": ["amd64", "x32", "x86"]}),
        _rule("socket", args=[_arg(0, _AF_VSOCK, "SCMP_CMP_NE")]),
        *(_rule("personality", args=[_arg(0, value, "SCMP_CMP_EQ")]) for value in _PERSONALITIES),
        *(_rule(names, includes={"caps": [cap]}) for cap, names in _BY_CAPABILITY),
        _rule("clone", args=[_arg(0, _CLONE_NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ")], excludes=no_admin),
        # ENOSYS, not EPERM: libc then falls back to clone(2), whose flags the filter can see.
        _rule("clone3", "SCMP_ACT_ERRNO", errnoRet=errno.ENOSYS, excludes=no_admin),
    ]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.EPERM,
        "archMap": [{"architecture": GUEST_ARCH, "subArchitectures": GUEST_ARCHITECTURES[1:]}],
        "syscalls": rules,
    }


def runtime_default(capabilities: Collection[str]) -> dict[str, Any]:
    """The RuntimeDefault profile for a container with these effective capabilities ("CAP_SYS_ADMIN"
    or "SYS_ADMIN"), as an OCI ``linux.seccomp`` object."""
    return _Converter("RuntimeDefault", capabilities).profile(_default_profile())


def from_profile_json(text: str | bytes, capabilities: Collection[str], source: str) -> dict[str, Any]:
    """A Docker/containerd-format (or OCI-shaped) profile as an OCI ``linux.seccomp`` object, its
    conditions resolved for the guest and ``capabilities``. ``source`` names the profile in errors."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(raw) > MAX_PROFILE_BYTES:
        raise SeccompError(f"seccomp profile {source}: larger than {MAX_PROFILE_BYTES} bytes")
    try:  # a UnicodeDecodeError is a ValueError too
        document = json.loads(raw.decode("utf-8-sig"), parse_constant=_no_constant)
    except RecursionError:
        raise SeccompError(f"seccomp profile {source}: not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise SeccompError(f"seccomp profile {source}: not valid JSON ({_short(str(e), 120)})") from None
    if not isinstance(document, dict):
        raise SeccompError(f"seccomp profile {source}: a JSON object is expected, not {_kind(document)}")
    return _Converter(source, capabilities).profile(document)


def load_localhost(path: str, capabilities: Collection[str]) -> dict[str, Any]:
    """The Localhost profile at ``path`` (absolute, on the host; symlinks are followed, the target
    must be a regular file), converted by :func:`from_profile_json`. Blocking file I/O."""
    shown = _short(path, 200) if path.isprintable() and path else repr(_short(path, 200))
    if not path or "\0" in path or len(path) > MAX_PATH:
        raise SeccompError(f"seccomp profile {shown}: not a usable path")
    if not os.path.isabs(path):
        raise SeccompError(f"seccomp profile {shown}: not an absolute path (a localhost profile is a host path)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SeccompError(f"seccomp profile {shown}: not found") from None
    except OSError as e:
        raise SeccompError(f"seccomp profile {shown}: cannot be opened ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SeccompError(f"seccomp profile {shown}: not a regular file")
        if info.st_size > MAX_PROFILE_BYTES:
            raise SeccompError(f"seccomp profile {shown}: larger than {MAX_PROFILE_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise SeccompError(f"seccomp profile {shown}: cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
    return from_profile_json(data, capabilities, shown)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _short(value: str, limit: int = 40) -> str:
    return value[:limit] + ("..." if len(value) > limit else "")


def _kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null", int: "a number"}
    return kinds.get(type(value), "a fractional number")


def _cap(name: str) -> str:
    upper = name.upper()
    return upper if upper.startswith("CAP_") else "CAP_" + upper


@dataclass(frozen=True)
class _Condition:
    caps: frozenset[str]
    arches: frozenset[str]
    min_kernel: tuple[int, int, int] | None


class _Converter:
    """Checks one profile and resolves it for the guest and a capability set."""

    def __init__(self, source: str, capabilities: Collection[str]) -> None:
        if isinstance(capabilities, str):
            raise TypeError("capabilities must be a collection of names, not one string")
        self.source = source
        self.caps = frozenset(_cap(c) for c in capabilities)

    def fail(self, where: str, what: str) -> SeccompError:
        return SeccompError(f"seccomp profile {self.source}: {where}: {what}")

    def profile(self, doc: dict[str, Any]) -> dict[str, Any]:
        if doc.get("listenerPath"):
            raise self.fail("listenerPath", "seccomp notify listeners are not supported")
        if "defaultAction" not in doc:
            raise self.fail("defaultAction", "missing (every profile needs a default action)")
        default = self.action(doc["defaultAction"], "defaultAction")
        default_errno = self.errno_ret(doc.get("defaultErrnoRet"), default, "defaultErrnoRet")
        out: dict[str, Any] = {"defaultAction": default}
        if default_errno is not None:
            out["defaultErrnoRet"] = default_errno
        architectures = self.architectures(doc)
        if architectures:
            out["architectures"] = architectures
        flags = self.strings(doc.get("flags"), "flags", 8)
        for flag in flags:
            if flag not in FLAGS:
                raise self.fail("flags", f"{_short(flag)!r} is not a supported flag ({', '.join(sorted(FLAGS))})")
        if flags:
            out["flags"] = list(dict.fromkeys(flags))
        out["syscalls"] = self.syscalls(doc.get("syscalls"), (default, _effective(default, default_errno)))
        return out

    def action(self, value: Any, where: str) -> str:
        if value == "SCMP_ACT_NOTIFY":
            raise self.fail(where, "SCMP_ACT_NOTIFY needs a notify listener, which this runtime does not provide")
        if not isinstance(value, str) or value not in ACTIONS:
            shown = repr(_short(value)) if isinstance(value, str) else _kind(value)
            raise self.fail(where, f"{shown} is not a seccomp action ({', '.join(sorted(ACTIONS))})")
        return value

    def errno_ret(self, value: Any, action: str, where: str) -> int | None:
        if value is None:
            return None
        if action not in _ERRNO_ACTIONS:
            raise self.fail(where, f"only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take a return value, not {action}")
        return self.integer(value, where, MAX_ERRNO if action == "SCMP_ACT_ERRNO" else 0xFFFF)

    def integer(self, value: Any, where: str, maximum: int) -> int:
        if type(value) is not int:
            raise self.fail(where, f"an integer is expected, not {_kind(value)}")
        if not 0 <= value <= maximum:
            raise self.fail(where, f"{_short(str(value))} is out of range (0 to {maximum})")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"a string is expected, not {_kind(value)}")
        return value

    def strings(self, value: Any, where: str, limit: int) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(where, f"a list is expected, not {_kind(value)}")
        if len(value) > limit:
            raise self.fail(where, f"{len(value)} entries, more than the {limit} allowed")
        return [self.string(item, f"{where}[{i}]") for i, item in enumerate(value)]

    def architectures(self, doc: dict[str, Any]) -> list[str]:
        found = self.strings(doc.get("architectures"), "architectures", len(ARCHITECTURES))
        arch_map = doc.get("archMap")
        if found and arch_map:
            raise self.fail("archMap", "give either architectures or archMap, not both")
        if arch_map is not None:
            if not isinstance(arch_map, list) or len(arch_map) > len(ARCHITECTURES):
                raise self.fail("archMap", f"a list of at most {len(ARCHITECTURES)} entries is expected")
            for i, entry in enumerate(arch_map):
                where = f"archMap[{i}]"
                if not isinstance(entry, dict):
                    raise self.fail(where, f"an object is expected, not {_kind(entry)}")
                main = [self.string(entry.get("architecture"), f"{where}.architecture")]
                subs = self.strings(entry.get("subArchitectures"), f"{where}.subArchitectures", len(ARCHITECTURES))
                self.check_arches(main + subs, where)
                if main[0] == GUEST_ARCH:  # the guest's entry only, as moby does
                    found = found + main + subs
        self.check_arches(found, "architectures")
        return list(dict.fromkeys(found))

    def check_arches(self, names: list[str], where: str) -> None:
        for name in names:
            if name not in ARCHITECTURES:
                raise self.fail(where, f"{_short(name)!r} is not a seccomp architecture (SCMP_ARCH_X86_64, ...)")

    def syscalls(self, value: Any, default: tuple[str, int | None]) -> list[dict[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail("syscalls", f"a list is expected, not {_kind(value)}")
        if len(value) > MAX_RULES:
            raise self.fail("syscalls", f"{len(value)} rules, more than the {MAX_RULES} allowed")
        rules = []
        for i, raw in enumerate(value):
            rule = self.rule(raw, f"syscalls[{i}]")
            if rule is not None and (rule["action"], _effective(rule["action"], rule.get("errnoRet"))) != default:
                rules.append(rule)  # a rule that does what the default does is left out (libseccomp refuses it)
        return rules

    def rule(self, raw: Any, where: str) -> dict[str, Any] | None:
        """The rule in OCI shape, or None when its includes/excludes leave it out here."""
        if not isinstance(raw, dict):
            raise self.fail(where, f"an object is expected, not {_kind(raw)}")
        names = self.names(raw, where)
        action = self.action(raw.get("action"), f"{where}.action")
        errno_ret = self.errno_ret(raw.get("errnoRet"), action, f"{where}.errnoRet")
        args = self.args(raw.get("args"), f"{where}.args")
        includes = self.condition(raw.get("includes"), f"{where}.includes")
        excludes = self.condition(raw.get("excludes"), f"{where}.excludes")
        if not self.applies(includes, excludes):
            return None
        out: dict[str, Any] = {"names": names, "action": action}
        if errno_ret is not None:
            out["errnoRet"] = errno_ret
        if args:
            out["args"] = args
        return out

    def names(self, raw: dict[str, Any], where: str) -> list[str]:
        single, several = raw.get("name"), raw.get("names")
        if single is not None and several is not None:
            raise self.fail(where, "give either name or names, not both")
        if single is not None:
            names = [self.string(single, f"{where}.name")]
        else:
            names = self.strings(several, f"{where}.names", MAX_NAMES)
        if not names:
            raise self.fail(where, "no syscall names")
        for name in names:
            if not _SYSCALL_NAME.fullmatch(name):
                raise self.fail(f"{where}.names", f"{_short(name)!r} is not a syscall name")
        return list(names)

    def args(self, value: Any, where: str) -> list[dict[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, list) or len(value) > MAX_ARGS:
            raise self.fail(where, f"a list of at most {MAX_ARGS} argument conditions is expected")
        out = []
        for i, arg in enumerate(value):
            at = f"{where}[{i}]"
            if not isinstance(arg, dict):
                raise self.fail(at, f"an object is expected, not {_kind(arg)}")
            index = self.integer(arg.get("index"), f"{at}.index", 5)
            op = arg.get("op")
            if not isinstance(op, str) or op not in OPS:
                shown = repr(_short(op)) if isinstance(op, str) else _kind(op)
                raise self.fail(f"{at}.op", f"{shown} is not a comparison ({', '.join(sorted(OPS))})")
            value_one = self.integer(arg.get("value", 0), f"{at}.value", (1 << 64) - 1)
            value_two = self.integer(arg.get("valueTwo", 0), f"{at}.valueTwo", (1 << 64) - 1)
            out.append({"index": index, "value": value_one, "valueTwo": value_two, "op": op})
        return out

    def condition(self, value: Any, where: str) -> _Condition:
        if value is None:
            return _Condition(frozenset(), frozenset(), None)
        if not isinstance(value, dict):
            raise self.fail(where, f"an object is expected, not {_kind(value)}")
        caps = self.strings(value.get("caps"), f"{where}.caps", MAX_FILTER_ITEMS)
        arches = self.strings(value.get("arches"), f"{where}.arches", MAX_FILTER_ITEMS)
        for cap in caps:
            if not _CAP_NAME.fullmatch(cap):
                raise self.fail(f"{where}.caps", f"{_short(cap)!r} is not a capability name")
        for arch in arches:
            if not _ARCH_NAME.fullmatch(arch):
                raise self.fail(f"{where}.arches", f"{_short(arch)!r} is not an architecture name")
        kernel = value.get("minKernel")
        min_kernel = None
        if kernel is not None:
            match = _KERNEL.fullmatch(kernel) if isinstance(kernel, str) else None
            if match is None:
                raise self.fail(f"{where}.minKernel", 'a kernel version such as "5.8" is expected')
            min_kernel = (int(match[1]), int(match[2]), int(match[3] or 0))
        return _Condition(frozenset(_cap(c) for c in caps), frozenset(arches), min_kernel)

    def applies(self, includes: _Condition, excludes: _Condition) -> bool:
        """Whether a rule holds for the guest and these capabilities: every included capability, no
        excluded one, the guest's architecture among included (and not among excluded) arches, a
        guest kernel at least the included minKernel (and below the excluded one)."""
        if excludes.arches & GUEST_ARCH_NAMES or excludes.caps & self.caps:
            return False
        if excludes.min_kernel is not None and excludes.min_kernel <= GUEST_KERNEL:
            return False
        if includes.arches and not includes.arches & GUEST_ARCH_NAMES:
            return False
        if not includes.caps <= self.caps:
            return False
        return includes.min_kernel is None or includes.min_kernel <= GUEST_KERNEL


def _effective(action: str, errno_ret: int | None) -> int | None:
    """The value an action returns: SCMP_ACT_ERRNO without one returns EPERM (the OCI default)."""
    if action == "SCMP_ACT_ERRNO" and errno_ret is None:
        return errno.EPERM
    return errno_ret
