"""prepare_dataset: real data where cheap, tiny generated fixtures in the real layouts otherwise."""

import csv
import hashlib
import io
import pickle
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from metatransfer.data import _cifar, _omniglot
from metatransfer.data._cifar_splits import FINE_NAMES
from metatransfer.data.cache import load_split, read_manifest
from metatransfer.data.prepare import DATASETS, prepare_dataset

FC100_ZIP_SHA256 = "dc5c4701fc0dde0bbaad233674a0e9d93cb53b7061b888ccaa63658b362db085"


def _quiet(message):
    pass


def _no_leftovers(root, allowed=()):
    """Nothing but the allowed entries (no temp folders) is left in the cache root."""
    assert sorted(p.name for p in root.iterdir()) == sorted(allowed)


def _counts(root, name):
    manifest = read_manifest(root, name)
    return {s: (len(v["classes"]), set(v["images_per_class"])) for s, v in manifest["splits"].items()}


# --- real data ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_fc100_from_real_zip(prepared_fc100, shared_data):
    root, name = prepared_fc100
    assert _counts(root, name) == {"train": (60, {600}), "val": (20, {600}), "test": (20, {600})}
    manifest = read_manifest(root, name)
    assert manifest["source"]["sha256"] == FC100_ZIP_SHA256
    assert manifest["protocol"].startswith("fc100 superclass split (TADAM")
    test = load_split(root, name, "test")
    assert test.images.shape == (12000, 32, 32, 3)
    assert {"baby", "whale", "bee"} <= set(test.class_names)  # people, aquatic_mammals, insects
    assert np.all(np.diff(test.labels) >= 0)
    first = test.class_names[0]
    with zipfile.ZipFile(shared_data / "cifar100" / "cifar100_png.zip") as archive:
        png = archive.read(f"cifar100/{first}/{first}_000.png")
    np.testing.assert_array_equal(test.images[0], np.asarray(Image.open(io.BytesIO(png))))
    assert all(0.4 < m < 0.6 for m in test.mean) and all(0.2 < s < 0.35 for s in test.std)


@pytest.mark.slow
def test_cifar_fs_from_real_zip(shared_data, tmp_path):
    messages = []
    prepare_dataset("cifar-fs", shared_data / "cifar100" / "cifar100_png.zip", tmp_path, log=messages.append)
    assert _counts(tmp_path, "cifar-fs") == {"train": (64, {600}), "val": (16, {600}), "test": (20, {600})}
    assert "cifar-fs: train 64 classes x 600, val 16 x 600, test 20 x 600 — matches the benchmark" in messages
    assert "beaver" in load_split(tmp_path, "cifar-fs", "val").class_names
    _no_leftovers(tmp_path, ["cifar-fs"])


@pytest.mark.slow
def test_omniglot_lake_split(prepared_omniglot):
    root, name = prepared_omniglot
    counts = _counts(root, name)
    assert counts["train"][0] + counts["val"][0] == 964 and counts["test"] == (659, {20})
    val = load_split(root, name, "val")
    assert {c.split("/")[0] for c in val.class_names} == set(_omniglot.VAL_ALPHABETS)
    train = load_split(root, name, "train")
    assert not {c.split("/")[0] for c in train.class_names} & set(_omniglot.VAL_ALPHABETS)
    assert train.images.shape[1:] == (28, 28, 1)
    # Inverted: a dark background (corners 0) with bright ink.
    assert train.images[:, 0, 0, 0].max() == 0 and train.images.max() == 255
    assert train.mean[0] < 0.2
    assert read_manifest(root, name)["protocol"].startswith("omniglot lake")


@pytest.mark.slow
def test_omniglot_vinyals_split(prepared_omniglot_vinyals):
    root, name = prepared_omniglot_vinyals
    assert _counts(root, name) == {"train": (4112, {20}), "val": (688, {20}), "test": (1692, {20})}
    train = load_split(root, name, "train")
    assert train.class_names[:2] == ["Angelic/character01/rot000", "Angelic/character01/rot090"]
    upright, turned = train.images[0:20], train.images[20:40]
    np.testing.assert_array_equal(turned, np.rot90(upright, 1, axes=(1, 2)))


@pytest.mark.slow
def test_omniglot_lake_with_rotations(shared_data, tmp_path, prepared_omniglot):
    prepare_dataset("omniglot", shared_data / "omniglot", tmp_path, rotations=True, log=_quiet)
    plain = _counts(*prepared_omniglot)
    counts = _counts(tmp_path, "omniglot")
    assert {s: c[0] for s, c in counts.items()} == {s: 4 * c[0] for s, c in plain.items()}
    test = load_split(tmp_path, "omniglot", "test")
    assert test.class_names[:4] == [test.class_names[0]] + [f"{test.class_names[0]}/rot{d}" for d in ("090", "180", "270")]
    np.testing.assert_array_equal(test.images[40:60], np.rot90(test.images[0:20], 2, axes=(1, 2)))


def test_rotations_with_vinyals_split_is_rejected(shared_data, tmp_path):
    with pytest.raises(ValueError, match="rotations=True applies to Lake's split only"):
        prepare_dataset("omniglot", shared_data / "omniglot", tmp_path, rotations=True,
                        split_dir=shared_data / "omniglot" / "splits" / "vinyals", log=_quiet)
    _no_leftovers(tmp_path)


# --- tiny omniglot in the original layout (counts patched down) ---------------------------------


@pytest.fixture
def tiny_omniglot(tmp_path, monkeypatch):
    """Extracted images_background/ (2 alphabets) and images_evaluation/ (1), 20 drawings each."""
    monkeypatch.setattr(_omniglot, "SETS", {"images_background": 3, "images_evaluation": 2})
    monkeypatch.setattr(_omniglot, "VAL_ALPHABETS", ("Beta",))
    source = tmp_path / "omniglot"
    layout = {"images_background": {"Alpha": 2, "Beta": 1}, "images_evaluation": {"Gamma": 2}}
    for set_name, alphabets in layout.items():
        for alphabet, num_chars in alphabets.items():
            for index in range(1, num_chars + 1):
                folder = source / set_name / alphabet / f"character{index:02d}"
                folder.mkdir(parents=True)
                for k in range(1, 21):
                    ink = np.ones((105, 105), dtype=bool)
                    ink[10:40, 10 + k : 20 + k] = False  # black stroke on white, as in Omniglot
                    Image.fromarray(ink).save(folder / f"0001_{k:02d}.png")
    return source


def _zip_folder(folder, archive, corrupt=None):
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = str(path.relative_to(folder.parent))
                handle.writestr(name, b"not a png" if name == corrupt else path.read_bytes())


def test_tiny_omniglot_from_extracted_folders(tiny_omniglot, tmp_path):
    prepare_dataset("omniglot", tiny_omniglot, tmp_path / "cache", log=_quiet)
    assert _counts(tmp_path / "cache", "omniglot") == {"train": (2, {20}), "val": (1, {20}), "test": (2, {20})}
    image = load_split(tmp_path / "cache", "omniglot", "train").images[0, ..., 0]
    assert image[0, 0] == 0 and image.max() == 255  # inverted


def test_omniglot_corrupt_png_in_zip_is_named(tiny_omniglot, tmp_path):
    zips = tmp_path / "zips"
    zips.mkdir()
    bad = "images_background/Alpha/character02/0001_07.png"
    _zip_folder(tiny_omniglot / "images_background", zips / "images_background.zip", corrupt=bad)
    _zip_folder(tiny_omniglot / "images_evaluation", zips / "images_evaluation.zip")
    with pytest.raises(ValueError, match=f"Cannot read image '{bad}' in .*images_background.zip"):
        prepare_dataset("omniglot", zips, tmp_path / "cache", log=_quiet)
    _no_leftovers(tmp_path / "cache")


def test_omniglot_split_file_naming_missing_character(tiny_omniglot, tmp_path):
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    (split_dir / "train.txt").write_text("Alpha/character01/rot000\nAlpha/character09/rot090\n")
    (split_dir / "val.txt").write_text("Beta/character01/rot000\n")
    (split_dir / "test.txt").write_text("Gamma/character01/rot000\n")
    with pytest.raises(FileNotFoundError, match=r"train.txt names character Alpha/character09"):
        prepare_dataset("omniglot", tiny_omniglot, tmp_path / "cache", split_dir=split_dir, log=_quiet)
    _no_leftovers(tmp_path / "cache")


def test_omniglot_overlapping_split_files_name_the_classes(tiny_omniglot, tmp_path):
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    (split_dir / "train.txt").write_text("Alpha/character01/rot000\n")
    (split_dir / "val.txt").write_text("Alpha/character01/rot000\n")
    (split_dir / "test.txt").write_text("Gamma/character01/rot000\n")
    with pytest.raises(ValueError, match=r"'train' and 'val' share 1 classes \(Alpha/character01/rot000\)"):
        prepare_dataset("omniglot", tiny_omniglot, tmp_path / "cache", split_dir=split_dir, log=_quiet)


def test_omniglot_incomplete_archive_is_reported(tiny_omniglot, tmp_path, monkeypatch):
    monkeypatch.setattr(_omniglot, "SETS", {"images_background": 964, "images_evaluation": 2})
    with pytest.raises(ValueError, match="images_background: found 3 characters, expected 964"):
        prepare_dataset("omniglot", tiny_omniglot, tmp_path / "cache", log=_quiet)
