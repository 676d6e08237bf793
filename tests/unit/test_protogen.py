"""The generated protocol code in the tree must match the .proto files."""

from pathlib import Path

from kvmsandbox.tools import protogen


def test_generated_code_is_current(tmp_path: Path) -> None:
    protogen.generate(tmp_path)
    generated = protogen.generated_paths(tmp_path)
    assert generated, "protoc produced nothing"
    stale = [
        str(rel)
        for rel in generated
        if not (protogen.PACKAGE_ROOT / rel).exists()
        or (protogen.PACKAGE_ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"
