from kvmsandbox.agent.guest.oci_check import validate_process
from kvmsandbox.sandbox.oci_spec import Isolation, Mount, ProcessSpec, container_spec, process_object


def test_container_spec_has_what_crun_needs() -> None:
    spec = container_spec(
        root_path="/run/x/rootfs",
        process=ProcessSpec(args=["sh", "-c", "true"], env=["A=1"], cwd="/work", uid=1000, gid=1000),
        mounts=[Mount("/run/kvmsandbox/sandbox/hosts", "/etc/hosts", readonly=True)],
        cgroups_path="/kvmsandbox/c1",
    )
    assert spec["root"] == {"path": "/run/x/rootfs", "readonly": False}
    assert spec["process"]["args"] == ["sh", "-c", "true"]
    assert spec["process"]["env"][0].startswith("PATH=") and "A=1" in spec["process"]["env"]
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000}
    # The guest's network, IPC and UTS namespaces (and hostname) are the pod's: not the container's own.
    assert "hostname" not in spec
    assert spec["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"}, {"type": "cgroup"}]
    assert "seccomp" not in spec["linux"] and "devices" not in spec["linux"].get("resources", {})
    sysfs = next(m for m in spec["mounts"] if m["destination"] == "/sys")
    assert "ro" in sysfs["options"]
    hosts = next(m for m in spec["mounts"] if m["destination"] == "/etc/hosts")
    assert hosts["type"] == "bind" and "ro" in hosts["options"]
    assert spec["linux"]["cgroupsPath"] == "/kvmsandbox/c1"


def test_an_explicit_path_is_kept() -> None:
    env = process_object(ProcessSpec(args=["x"], env=["PATH=/opt/bin"]))["env"]
    assert env == ["PATH=/opt/bin"]


def test_the_agent_accepts_the_process_the_host_builds() -> None:
    assert validate_process(process_object(ProcessSpec(args=["true"])), "process")["args"] == ["true"]


def test_isolation_joins_a_pid_namespace_filters_syscalls_and_opens_up_privileged() -> None:
    seccomp = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
    spec = container_spec(
        root_path="/r",
        process=ProcessSpec(args=["x"]),
        resources={"memory": {"limit": 1 << 20}},
        isolation=Isolation(
            masked_paths=["/a"], readonly_paths=[], seccomp=seccomp, pid_namespace="/proc/7/ns/pid", privileged=True
        ),
    )
    linux = spec["linux"]
    assert linux["namespaces"][0] == {"type": "pid", "path": "/proc/7/ns/pid"}
    assert linux["seccomp"] == seccomp and linux["maskedPaths"] == ["/a"] and linux["readonlyPaths"] == []
    assert linux["resources"] == {"memory": {"limit": 1 << 20}, "devices": [{"allow": True, "access": "rwm"}]}
    assert next(m for m in spec["mounts"] if m["destination"] == "/dev/shm")["type"] == "tmpfs"
    pod_shm = container_spec(root_path="/r", process=ProcessSpec(args=["x"]), isolation=Isolation(shm="/run/p/shm"))
    shm = next(m for m in pod_shm["mounts"] if m["destination"] == "/dev/shm")
    assert shm["type"] == "bind" and shm["source"] == "/run/p/shm"
    for dest in ("/sys", "/sys/fs/cgroup"):
        assert "ro" not in next(m for m in spec["mounts"] if m["destination"] == dest)["options"]
