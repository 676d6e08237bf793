"""The seccomp profiles a container gets: RuntimeDefault, Docker-format and OCI-shaped profiles from
JSON or a Localhost path, and the hostile inputs they must refuse with InvalidArgument."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from kvmsandbox.cri import seccomp
from kvmsandbox.cri.seccomp import MAX_PROFILE_BYTES, from_profile_json, load_localhost, runtime_default
from kvmsandbox.errors import InvalidArgument

DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
ADDED_CAPS = ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_SYS_MODULE", "CAP_SYS_BOOT", "CAP_SYS_TIME", "CAP_SYS_NICE"]
ADDED_CAPS += ["CAP_SYSLOG", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_PACCT", "CAP_SYS_RAWIO", "CAP_DAC_READ_SEARCH"]
ALL_CAPS = [*DEFAULT_CAPS, *ADDED_CAPS, "CAP_SYS_TTY_CONFIG"]
BLOCK_HOSTNAME = (
    '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}]}'
)
BLOCK_CHMOD = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [{"names": ["chmod", "fchmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}],
}
OCI_KEYS = {"defaultAction", "defaultErrnoRet", "architectures", "flags", "syscalls"}
RULE_KEYS = {"names", "action", "errnoRet", "args"}


def unconditional(profile: dict[str, Any], action: str = "SCMP_ACT_ALLOW") -> set[str]:
    """Names a rule without argument conditions gives ``action``."""
    return {n for r in profile["syscalls"] if r["action"] == action and "args" not in r for n in r["names"]}


def rules_for(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in profile["syscalls"] if name in r["names"]]


def convert(document: Any, caps: list[str] | None = None) -> dict[str, Any]:
    return from_profile_json(json.dumps(document), caps if caps is not None else DEFAULT_CAPS, "test.json")


def refused(document: Any, *fragments: str) -> str:
    text = document if isinstance(document, str | bytes) else json.dumps(document)
    with pytest.raises(InvalidArgument) as caught:
        from_profile_json(text, DEFAULT_CAPS, "hostile.json")
    message = str(caught.value)
    assert "hostile.json" in message
    for fragment in fragments:
        assert fragment in message
    return message


# ---- RuntimeDefault


def test_default_is_an_allowlist_failing_with_eperm() -> None:
    profile = runtime_default(DEFAULT_CAPS)
    assert set(profile) <= OCI_KEYS
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    allowed = unconditional(profile)
    for name in ("read", "write", "openat", "execve", "exit_group", "futex", "mmap", "arch_prctl", "chroot"):
        assert name in allowed
    for rule in profile["syscalls"]:
        assert set(rule) <= RULE_KEYS


@pytest.mark.parametrize("name", ["mount", "umount2", "sethostname", "setdomainname", "unshare", "setns"])
def test_default_denies_admin_syscalls_without_sys_admin(name: str) -> None:
    assert rules_for(runtime_default(DEFAULT_CAPS), name) == []
    assert name in unconditional(runtime_default([*DEFAULT_CAPS, "CAP_SYS_ADMIN"]))
    assert name in unconditional(runtime_default(["SYS_ADMIN"]))  # the CRI spelling works too


def test_default_clone_without_sys_admin_forbids_namespace_flags() -> None:
    profile = runtime_default(DEFAULT_CAPS)
    (clone,) = rules_for(profile, "clone")
    (arg,) = clone["args"]
    assert (arg["index"], arg["op"], arg["valueTwo"]) == (0, "SCMP_CMP_MASKED_EQ", 0)
    # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
    flags = (0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
    assert arg["value"] == sum(flags)
    (clone3,) = rules_for(profile, "clone3")
    assert clone3 == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}


def test_default_clone_with_sys_admin_is_unconditional() -> None:
    profile = runtime_default(["CAP_SYS_ADMIN"])
    assert {"clone", "clone3"} <= unconditional(profile)
    assert all("args" not in r for r in rules_for(profile, "clone"))
    assert all(r["action"] == "SCMP_ACT_ALLOW" for r in rules_for(profile, "clone3"))


@pytest.mark.parametrize(
    ("cap", "names"),
    [
        ("CAP_SYS_PTRACE", ["kcmp", "pidfd_getfd"]),
        ("CAP_SYS_MODULE", ["init_module", "finit_module", "delete_module"]),
        ("CAP_SYS_BOOT", ["reboot"]),
        ("CAP_SYS_TIME", ["settimeofday", "clock_settime"]),
        ("CAP_SYS_NICE", ["mbind", "set_mempolicy"]),
        ("CAP_SYSLOG", ["syslog"]),
        ("CAP_BPF", ["bpf"]),
        ("CAP_PERFMON", ["perf_event_open"]),
        ("CAP_SYS_PACCT", ["acct"]),
        ("CAP_SYS_RAWIO", ["iopl", "ioperm"]),
        ("CAP_DAC_READ_SEARCH", ["open_by_handle_at"]),
    ],
)
def test_default_capability_gated_syscalls(cap: str, names: list[str]) -> None:
    without = unconditional(runtime_default(DEFAULT_CAPS))
    with_cap = unconditional(runtime_default([*DEFAULT_CAPS, cap]))
    for name in names:
        assert name not in without
        assert name in with_cap


def test_default_personality_socket_and_ptrace() -> None:
    profile = runtime_default(DEFAULT_CAPS)
    values = sorted(r["args"][0]["value"] for r in rules_for(profile, "personality"))
    assert values == [0, 8, 0x20000, 0x20008, 0xFFFFFFFF]
    (socket,) = rules_for(profile, "socket")
    assert socket["args"] == [{"index": 0, "value": 40, "valueTwo": 0, "op": "SCMP_CMP_NE"}]  # no AF_VSOCK
    assert {"ptrace", "process_vm_readv"} <= unconditional(profile)  # guest kernel >= 4.8, as moby


@pytest.mark.parametrize("caps", [DEFAULT_CAPS, ALL_CAPS, []])
def test_default_round_trips_through_the_profile_checks(caps: list[str]) -> None:
    profile = runtime_default(caps)
    assert from_profile_json(json.dumps(profile), caps, "round-trip") == profile


def test_default_names_are_known_and_not_too_new() -> None:
    names = {n for r in runtime_default(ALL_CAPS)["syscalls"] for n in r["names"]}
    for name in ("cachestat", "fchmodat2", "map_shadow_stack", "futex_wake"):
        assert name not in names  # newer than libseccomp 2.5.4 upstream knows
    assert len(names) > 300


# ---- Localhost and JSON profiles


def test_critest_block_hostname_profile(tmp_path: Path) -> None:
    path = tmp_path / "block-host-name.json"
    path.write_text(BLOCK_HOSTNAME)
    profile = load_localhost(str(path), ["CAP_SYS_ADMIN"])
    assert profile == {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}],
    }


def test_block_chmod_profile() -> None:
    profile = from_profile_json(json.dumps(BLOCK_CHMOD).encode(), DEFAULT_CAPS, "block-chmod.json")
    assert profile == BLOCK_CHMOD


def test_localhost_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real.json").write_text(json.dumps(BLOCK_CHMOD))
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    assert load_localhost(str(tmp_path / "link.json"), []) == BLOCK_CHMOD


def test_old_single_name_errno_args_and_flags() -> None:
    document = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "listenerPath": "",
        "syscalls": [
            {"name": "read", "action": "SCMP_ACT_ALLOW", "args": [], "comment": "ignored"},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 3},
            {"names": ["write"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 2, "op": "SCMP_CMP_LE"}]},
            {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},  # what the default does: left out
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO"},  # EPERM too: left out
        ],
    }
    assert convert(document) == {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 3},
            {
                "names": ["write"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 2, "valueTwo": 0, "op": "SCMP_CMP_LE"}],
            },
        ],
    }


def test_includes_and_excludes() -> None:
    document = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["kcmp"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]}},
            {"names": ["unshare"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN", "CAP_BPF"]}},
            {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
            {"names": ["cacheflush"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm", "arm64"]}},
            {"names": ["modify_ldt"], "action": "SCMP_ACT_ALLOW", "excludes": {"arches": ["amd64"]}},
            {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4.8"}},
            {"names": ["futex_waitv"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "6.2"}},
            {"names": ["uselib"], "action": "SCMP_ACT_ALLOW", "excludes": {"minKernel": "5.10.3"}},
        ],
    }
    assert unconditional(convert(document, [])) == {"unshare", "arch_prctl", "ptrace"}
    assert unconditional(convert(document, ["CAP_SYS_ADMIN"])) == {"mount", "arch_prctl", "ptrace"}
    assert unconditional(convert(document, ["SYS_ADMIN", "sys_ptrace"])) == {"mount", "kcmp", "arch_prctl", "ptrace"}


def test_arch_map_takes_the_guest_entry() -> None:
    document = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "archMap": [
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            {"architecture": "SCMP_ARCH_RISCV64", "subArchitectures": None},
        ],
    }
    profile = convert(document)
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert profile["syscalls"] == []
    refused({**document, "architectures": ["SCMP_ARCH_X86"]}, "archMap", "not both")
    refused({"defaultAction": "SCMP_ACT_ALLOW", "archMap": [{"architecture": "SCMP_ARCH_Z80"}]}, "SCMP_ARCH_Z80")


# ---- hostile input


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ("not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        ("[]", "a JSON object is expected, not a list"),
        ('"x"', "not a string"),
        ('{"defaultAction": NaN}', "not valid JSON"),
        ("{}", "defaultAction"),
        ({"defaultAction": "SCMP_ACT_FOO"}, "'SCMP_ACT_FOO' is not a seccomp action"),
        ({"defaultAction": "SCMP_ACT_NOTIFY"}, "notify listener"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x.sock"}, "listenerPath"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1}, "defaultErrnoRet"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}, "out of range"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]}, "not a supported flag"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": "SCMP_ARCH_X86_64"}, "a list is expected"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}, "a list is expected"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [1]}, "syscalls[0]: an object is expected"),
    ],
)
def test_refuses_bad_profiles(document: Any, fragment: str) -> None:
    refused(document, fragment)


def rule(**fields: Any) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["chmod"], "action": "SCMP_ACT_ERRNO", **fields}]}


def arg(**fields: Any) -> dict[str, Any]:
    return rule(args=[{"index": 0, "value": 1, "op": "SCMP_CMP_EQ", **fields}])


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        (rule(action="SCMP_ACT_KILL_EVERYTHING"), "syscalls[0].action"),
        (rule(action="SCMP_ACT_NOTIFY"), "notify listener"),
        (rule(action=None), "null is not a seccomp action"),
        (rule(names=["../x"]), "'../x' is not a syscall name"),
        (rule(names=[""]), "'' is not a syscall name"),
        (rule(names=["x" * 65]), "is not a syscall name"),
        (rule(names=[]), "no syscall names"),
        (rule(names=[7]), "syscalls[0].names[0]: a string is expected"),
        (rule(names=["read"] * 1025), "more than the 1024 allowed"),
        (rule(name="read"), "not both"),
        (rule(errnoRet=-1), "out of range"),
        (rule(errnoRet=True), "not a boolean"),
        (rule(action="SCMP_ACT_ALLOW", errnoRet=1), "take a return value"),
        (arg(op="SCMP_CMP_LIKE"), "'SCMP_CMP_LIKE' is not a comparison"),
        (arg(index=9), "args[0].index: 9 is out of range (0 to 5)"),
        (arg(index="0"), "args[0].index: an integer is expected, not a string"),
        (arg(value=-1), "args[0].value: -1 is out of range"),
        (arg(value=1 << 64), "args[0].value"),
        (arg(valueTwo=1.5), "not a fractional number"),
        (rule(args=[{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}] * 17), "at most 16"),
        (rule(includes={"caps": "CAP_SYS_ADMIN"}), "includes.caps: a list is expected"),
        (rule(includes={"caps": ["CAP SYS"]}), "not a capability name"),
        (rule(excludes={"arches": ["../amd64"]}), "not an architecture name"),
        (rule(includes={"minKernel": "six"}), "minKernel"),
        (rule(includes=[]), "includes: an object is expected"),
    ],
)
def test_refuses_bad_rules(document: Any, fragment: str) -> None:
    refused(document, fragment)


def test_refuses_too_many_rules() -> None:
    rules = [{"names": ["chmod"], "action": "SCMP_ACT_ERRNO"}] * 10000
    refused({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}, "10000 rules", "4096")


def test_refuses_deep_nesting_without_recursion_error() -> None:
    refused("[" * 100000 + "]" * 100000, "not valid JSON")
    refused('{"defaultAction": "SCMP_ACT_ALLOW", "x": ' + "[" * 100000 + "]" * 100000 + "}", "not valid JSON")


def test_refuses_huge_profiles(tmp_path: Path) -> None:
    huge = json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "comment": "x" * MAX_PROFILE_BYTES})
    refused(huge, "larger than 1048576 bytes")
    refused(huge.encode(), "larger than")
    path = tmp_path / "huge.json"
    path.write_text(huge)
    with pytest.raises(InvalidArgument, match="larger than"):
        load_localhost(str(path), [])


def test_localhost_refusals(tmp_path: Path) -> None:
    cases = {
        str(tmp_path): "not a regular file",
        "relative/profile.json": "not an absolute path",
        str(tmp_path / "missing.json"): "not found",
        "": "not a usable path",
        "/etc/\0passwd": "not a usable path",
    }
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases[str(fifo)] = "not a regular file"  # opened without blocking, then refused
    for path, fragment in cases.items():
        with pytest.raises(InvalidArgument) as caught:
            load_localhost(path, [])
        assert fragment in str(caught.value)
        assert str(caught.value).startswith("seccomp profile ")
        if path.isprintable() and path:
            assert path in str(caught.value)  # a person sees which file


def test_localhost_invalid_content_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["chmod"], "action": "NOPE"}]}')
    with pytest.raises(seccomp.SeccompError, match=f"seccomp profile {path}: syscalls\\[0\\].action"):
        load_localhost(str(path), [])


def test_capabilities_must_not_be_a_string() -> None:
    with pytest.raises(TypeError):
        runtime_default("CAP_SYS_ADMIN")


# ---- what libseccomp (as crun uses it) makes of the profiles

_LIB = ctypes.util.find_library("seccomp")


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6}
_OPS["SCMP_CMP_MASKED_EQ"] = 7


def _action(action: str, errno_ret: int | None) -> int:
    values = {"SCMP_ACT_ALLOW": 0x7FFF0000, "SCMP_ACT_KILL_PROCESS": 0x80000000, "SCMP_ACT_TRAP": 0x00030000}
    if action == "SCMP_ACT_ERRNO":
        return 0x00050000 | (1 if errno_ret is None else errno_ret)
    return values[action]


def _compile(profile: dict[str, Any]) -> None:
    """Builds the filter as crun does (without loading it) and exports its BPF: names libseccomp does
    not know, or rules it refuses, fail here."""
    lib = ctypes.CDLL(_LIB)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = ctypes.c_void_p(
        lib.seccomp_init(ctypes.c_uint32(_action(profile["defaultAction"], profile.get("defaultErrnoRet"))))
    )
    assert ctx.value
    try:
        for arch in profile.get("architectures", [])[1:]:
            token = lib.seccomp_arch_resolve_name(arch.removeprefix("SCMP_ARCH_").lower().encode())
            assert lib.seccomp_arch_add(ctx, ctypes.c_uint32(token)) == 0, arch
        for rule in profile["syscalls"]:
            args = rule.get("args", [])
            cmps = (_ArgCmp * max(1, len(args)))(
                *(_ArgCmp(a["index"], _OPS[a["op"]], a["value"], a["valueTwo"]) for a in args)
            )
            for name in rule["names"]:
                number = lib.seccomp_syscall_resolve_name(name.encode())
                assert number != -1, f"libseccomp does not know {name}"
                assert number < 451, f"{name} is newer than Linux 5.17 (libseccomp 2.5.4)"
                action = ctypes.c_uint32(_action(rule["action"], rule.get("errnoRet")))
                assert lib.seccomp_rule_add_array(ctx, action, number, len(args), cmps) == 0, name
        with open(os.devnull, "wb") as sink:
            assert lib.seccomp_export_bpf(ctx, sink.fileno()) == 0
    finally:
        lib.seccomp_release(ctx)


@pytest.mark.skipif(_LIB is None, reason="libseccomp is not installed")
@pytest.mark.parametrize("caps", [DEFAULT_CAPS, ALL_CAPS, []])
def test_libseccomp_compiles_the_default(caps: list[str]) -> None:
    _compile(runtime_default(caps))


@pytest.mark.skipif(_LIB is None, reason="libseccomp is not installed")
def test_libseccomp_compiles_the_critest_profiles() -> None:
    _compile(from_profile_json(BLOCK_HOSTNAME, ["CAP_SYS_ADMIN"], "block-host-name.json"))
    _compile(convert(BLOCK_CHMOD))


def test_the_default_profile_has_no_way_around_its_socket_rule() -> None:
    """io_uring makes sockets without socket(2), socketcall hides its arguments behind a pointer:
    either would reach AF_VSOCK, the guest's channel to the host, past the filter."""
    allowed = {
        n for r in seccomp.runtime_default([])["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]
    }
    assert not allowed & {"io_uring_setup", "io_uring_enter", "io_uring_register", "socketcall", "name_to_handle_at"}
    assert "name_to_handle_at" in {
        n
        for r in seccomp.runtime_default(["CAP_SYS_ADMIN"])["syscalls"]
        if r["action"] == "SCMP_ACT_ALLOW"
        for n in r["names"]
    }
