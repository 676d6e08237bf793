"""How a container's process is derived from its CRI config and its image's config."""

import os
from pathlib import Path

import pytest

from kvmsandbox.cri.process import command_line, merged_env, process_spec, resolve_user
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.errors import InvalidArgument

IMAGE = {"Entrypoint": ["/entry"], "Cmd": ["--default"], "Env": ["PATH=/bin", "A=image"], "WorkingDir": "/app"}


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        ([], [], ["/entry", "--default"]),
        ([], ["--mine"], ["/entry", "--mine"]),
        (["/bin/sh"], [], ["/bin/sh"]),
        (["/bin/sh"], ["-c", "true"], ["/bin/sh", "-c", "true"]),
    ],
)
def test_command_and_args_follow_kubernetes_rules(command: list[str], args: list[str], expected: list[str]) -> None:
    assert command_line(IMAGE, command, args) == expected


def test_nothing_to_run_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="no command"):
        command_line({}, [], [])


def test_container_env_overrides_the_image_env_by_name() -> None:
    env = merged_env(["PATH=/bin", "A=image"], [cri.KeyValue(key="A", value=b"pod"), cri.KeyValue(key="B", value=b"x")])
    assert env == ["PATH=/bin", "A=pod", "B=x"]


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    top, base = tmp_path / "top", tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nold:x:5:5::/:/bin/sh\n")
    (top / "etc").mkdir(parents=True)
    (top / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n")
    (top / "etc/group").write_text("root:x:0:\nstaff:x:50:\n")
    return [top, base]


def test_image_users_resolve_through_the_top_most_passwd(layers: list[Path]) -> None:
    assert resolve_user("", layers) == (0, 0)
    assert resolve_user("1234", layers) == (1234, 0)
    assert resolve_user("1234:7", layers) == (1234, 7)
    assert resolve_user("app", layers) == (1000, 1001)
    assert resolve_user("app:staff", layers) == (1000, 50)
    with pytest.raises(InvalidArgument, match="'old' is not in the image's /etc/passwd"):
        resolve_user("old", layers)


def test_security_context_beats_the_image_user(layers: list[Path]) -> None:
    config = cri.ContainerConfig(
        working_dir="/work",
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(
                run_as_user=cri.Int64Value(value=4000), run_as_group=cri.Int64Value(value=4001), supplemental_groups=[9]
            )
        ),
    )
    spec = process_spec(config, {**IMAGE, "User": "app"}, layers)
    # The primary group is among the supplementary ones too, as containerd gives them.
    assert (spec.uid, spec.gid, spec.additional_gids) == (4000, 4001, [4001, 9])
    assert spec.cwd == "/work" and spec.args == ["/entry", "--default"]
    assert process_spec(cri.ContainerConfig(), {**IMAGE, "User": "app"}, layers).cwd == "/app"


def test_stop_signals_from_image_configs() -> None:
    from kvmsandbox.cri.validate import stop_signal

    assert stop_signal("") == 15
    assert stop_signal("SIGQUIT") == stop_signal("QUIT") == stop_signal("3") == 3
    with pytest.raises(InvalidArgument, match="unknown stop signal"):
        stop_signal("SIGNOPE")


def test_image_account_files_are_read_inside_the_image(tmp_path: Path) -> None:
    """Links in an image resolve inside its layer, never on the host; odd files are not read."""
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "lib").mkdir()
    (layer / "lib" / "passwd").write_text("app:x:1000:1001::/:/bin/sh\n")
    (layer / "etc" / "passwd").symlink_to("/lib/passwd")  # absolute: inside the image
    (layer / "etc" / "group").symlink_to("/proc/kcore")  # would hang or leak the host's memory
    assert resolve_user("app", [layer]) == (1000, 1001)
    with pytest.raises(InvalidArgument, match="not in the image's /etc/group"):
        resolve_user("app:staff", [layer])
    host_like = tmp_path / "host-etc"
    host_like.mkdir()
    (host_like / "passwd").write_text("host:x:4242:4242::/:/bin/sh\n")
    (layer / "etc" / "passwd").unlink()
    (layer / "etc" / "passwd").symlink_to(f"../../../../../../../..{host_like}/passwd")
    with pytest.raises(InvalidArgument, match="not in the image's /etc/passwd"):
        resolve_user("host", [layer])
    (layer / "etc" / "passwd").unlink()
    os.mkfifo(layer / "etc" / "passwd")
    with pytest.raises(InvalidArgument):
        resolve_user("app", [layer])  # a FIFO is not read (it would block)
    (layer / "etc" / "passwd").unlink()
    (layer / "etc" / "passwd").write_bytes(b"x" * (2 * 1024 * 1024))
    with pytest.raises(InvalidArgument, match="larger than"):
        resolve_user("app", [layer])


def test_supplementary_groups_merge_the_images_unless_strict(tmp_path: Path) -> None:
    """As critest's predefined-group image: user 1000 is a member of group 50000 in /etc/group."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\ndefault-user:x:1000:1000::/home:/bin/sh\n")
    (tmp_path / "etc/group").write_text(
        "root:x:0:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"
    )
    sc = cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=1000), supplemental_groups=[1234])
    merged = process_spec(cri.ContainerConfig(linux=cri.LinuxContainerConfig(security_context=sc)), IMAGE, [tmp_path])
    assert (merged.uid, merged.gid, merged.additional_gids) == (1000, 1000, [1000, 50000, 1234])
    sc.supplemental_groups_policy = cri.Strict
    strict = process_spec(cri.ContainerConfig(linux=cri.LinuxContainerConfig(security_context=sc)), IMAGE, [tmp_path])
    assert (strict.gid, strict.additional_gids) == (1000, [1000, 1234])


def test_a_hostile_group_file_is_bounded(tmp_path: Path) -> None:
    """An image whose /etc/group lists the user in 5000 groups, or an account with no name."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("u:x:1000:1000::/:/bin/sh\n:x:2000:2000::/:/bin/sh\n")
    (tmp_path / "etc/group").write_text("".join(f"g{i}:x:{10000 + i}:u\n" for i in range(5000)) + "empty:x:7:\n")
    config = cri.ContainerConfig(
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=1000))
        )
    )
    with pytest.raises(InvalidArgument, match="more than 1024"):
        process_spec(config, IMAGE, [tmp_path])
    config.linux.security_context.run_as_user.value = 2000
    assert process_spec(config, IMAGE, [tmp_path]).additional_gids == [2000]  # no name: no image groups
