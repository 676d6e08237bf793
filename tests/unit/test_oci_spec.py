from kvmsandbox.agent.guest.oci_check import validate_process
from kvmsandbox.sandbox.oci_spec import Mount, ProcessSpec, container_spec, process_object


def test_container_spec_has_what_crun_needs() -> None:
    spec = container_spec(
        root_path="/run/x/rootfs",
        process=ProcessSpec(args=["sh", "-c", "true"], env=["A=1"], cwd="/work", uid=1000, gid=1000),
        hostname="pod",
        mounts=[Mount("/run/kvmsandbox/sandbox/hosts", "/etc/hosts", readonly=True)],
        cgroups_path="/kvmsandbox/c1",
    )
    assert spec["root"] == {"path": "/run/x/rootfs", "readonly": False}
    assert spec["process"]["args"] == ["sh", "-c", "true"]
    assert spec["process"]["env"][0].startswith("PATH=") and "A=1" in spec["process"]["env"]
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000}
    assert spec["hostname"] == "pod"
    assert {n["type"] for n in spec["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount", "cgroup"}
    hosts = next(m for m in spec["mounts"] if m["destination"] == "/etc/hosts")
    assert hosts["type"] == "bind" and "ro" in hosts["options"]
    assert spec["linux"]["cgroupsPath"] == "/kvmsandbox/c1"


def test_an_explicit_path_is_kept() -> None:
    env = process_object(ProcessSpec(args=["x"], env=["PATH=/opt/bin"]))["env"]
    assert env == ["PATH=/opt/bin"]


def test_the_agent_accepts_the_process_the_host_builds() -> None:
    assert validate_process(process_object(ProcessSpec(args=["true"])), "process")["args"] == ["true"]
