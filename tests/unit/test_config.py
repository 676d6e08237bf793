from pathlib import Path

import pytest

from kvmsandbox.config import Config, ConfigError, load_config, parse_config


def test_empty_config_gives_defaults() -> None:
    assert parse_config("") == Config()


def test_values_are_typed_and_nested() -> None:
    c = parse_config("state_dir: /tmp/x\nhypervisor: {backend: qemu, tb_cache_mib: 32}\nsandbox: {memory_mib: 512}")
    assert c.state_dir == Path("/tmp/x")
    assert c.hypervisor.backend == "qemu"
    assert c.hypervisor.tb_cache_mib == 32
    assert c.sandbox.memory_mib == 512
    assert c.libvirt_uri == "qemu:///embed?root=/tmp/x/libvirt"


def test_registry_mirrors_and_insecure_hosts() -> None:
    c = parse_config("registry:\n  mirrors: {registry.k8s.io: [http://127.0.0.1:5000]}\n  insecure: [10.0.0.1:5000]")
    assert c.registry.mirrors == {"registry.k8s.io": ["http://127.0.0.1:5000"]}
    assert c.registry.insecure == ["10.0.0.1:5000"]
    with pytest.raises(ConfigError, match=r"'registry.mirrors.registry.k8s.io\[0\]' must be a str"):
        parse_config("registry: {mirrors: {registry.k8s.io: [5]}}")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("hypervisor: {backend: xen}", "'hypervisor.backend' must be one of"),
        ("sandbox: {memry_mib: 1}", "unknown config key 'sandbox.memry_mib'"),
        ("sandbox: {vcpus: two}", "'sandbox.vcpus' must be a number"),
        ("agent: {ready_timeout_seconds: 0}", "must be positive"),
        ("- a\n- b", "must hold a mapping"),
        ("a: [", "not valid YAML"),
        # Users' ids, or a range reaching 2^31 (and -1, which leaves an id unchanged: root).
        ("hypervisor: {vmm_uid_base: 1000}", "'hypervisor.vmm_uid_base' must be between"),
        ("hypervisor: {vmm_uid_base: 4294967295}", "'hypervisor.vmm_uid_base' must be between"),
    ],
)
def test_bad_config_says_which_key_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_config(text)


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
