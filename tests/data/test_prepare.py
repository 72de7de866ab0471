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
from metatransfer.data.cache import describe, load_split, read_manifest
from metatransfer.data.prepare import DATASETS, prepare_dataset

FC100_ZIP_SHA256 = "dc5c4701fc0dde0bbaad233674a0e9d93cb53b7061b888ccaa63658b362db085"


def _quiet(message):
    pass


def _no_leftovers(root, allowed=()):
    """Nothing but the allowed entries (no temp folders) is left in the cache root."""
    assert sorted(p.name for p in root.iterdir()) == sorted(allowed)


def _counts(root, name):
    manifest = read_manifest(root, name)
    return {
        s: (len(v["classes"]), set(v["images_per_class"])) for s, v in manifest["splits"].items()
    }


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
    prepare_dataset(
        "cifar-fs", shared_data / "cifar100" / "cifar100_png.zip", tmp_path, log=messages.append
    )
    assert _counts(tmp_path, "cifar-fs") == {
        "train": (64, {600}),
        "val": (16, {600}),
        "test": (20, {600}),
    }
    assert (
        "cifar-fs: train 64 classes x 600, val 16 x 600, test 20 x 600 — matches the benchmark"
        in messages
    )
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
    assert test.class_names[:4] == [test.class_names[0]] + [
        f"{test.class_names[0]}/rot{d}" for d in ("090", "180", "270")
    ]
    np.testing.assert_array_equal(test.images[40:60], np.rot90(test.images[0:20], 2, axes=(1, 2)))


def test_rotations_with_vinyals_split_is_rejected(shared_data, tmp_path):
    with pytest.raises(ValueError, match="rotations=True applies to Lake's split only"):
        prepare_dataset(
            "omniglot",
            shared_data / "omniglot",
            tmp_path,
            rotations=True,
            split_dir=shared_data / "omniglot" / "splits" / "vinyals",
            log=_quiet,
        )
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
    assert _counts(tmp_path / "cache", "omniglot") == {
        "train": (2, {20}),
        "val": (1, {20}),
        "test": (2, {20}),
    }
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
        prepare_dataset(
            "omniglot", tiny_omniglot, tmp_path / "cache", split_dir=split_dir, log=_quiet
        )
    _no_leftovers(tmp_path / "cache")


def test_omniglot_overlapping_split_files_name_the_classes(tiny_omniglot, tmp_path):
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    (split_dir / "train.txt").write_text("Alpha/character01/rot000\n")
    (split_dir / "val.txt").write_text("Alpha/character01/rot000\n")
    (split_dir / "test.txt").write_text("Gamma/character01/rot000\n")
    with pytest.raises(
        ValueError, match=r"'train' and 'val' share 1 classes \(Alpha/character01/rot000\)"
    ):
        prepare_dataset(
            "omniglot", tiny_omniglot, tmp_path / "cache", split_dir=split_dir, log=_quiet
        )


def test_omniglot_incomplete_archive_is_reported(tiny_omniglot, tmp_path, monkeypatch):
    monkeypatch.setattr(_omniglot, "SETS", {"images_background": 964, "images_evaluation": 2})
    with pytest.raises(ValueError, match="images_background: found 3 characters, expected 964"):
        prepare_dataset("omniglot", tiny_omniglot, tmp_path / "cache", log=_quiet)


# --- CIFAR-100: canonical tar.gz (md5 patched to a fake) and class-folder zips --------------------


def _fake_cifar_tar(path, per_class=(2, 1)):
    """A cifar-100-python.tar.gz with `per_class` (train, test) images of every class; pixel
    (channel c) = 10 * c + image index within the class, to check CHW -> HWC and the order."""
    parts = {}
    for member, count, offset in (("train", per_class[0], 0), ("test", per_class[1], per_class[0])):
        labels = np.repeat(np.arange(100), count)
        index = np.tile(np.arange(count), 100) + offset
        data = (10 * np.arange(3)[None, :, None] + index[:, None, None]).repeat(1024, axis=2)
        parts[member] = {
            b"data": data.reshape(len(labels), 3072).astype(np.uint8),
            b"fine_labels": labels.tolist(),
        }
    parts["meta"] = {b"fine_label_names": [n.encode() for n in FINE_NAMES]}
    with tarfile.open(path, "w:gz") as tar:
        for member, content in parts.items():
            blob = pickle.dumps(content)
            info = tarfile.TarInfo(f"cifar-100-python/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_canonical_tar_layout_is_decoded(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-100-python.tar.gz"
    monkeypatch.setattr(_cifar, "CIFAR100_MD5", _fake_cifar_tar(archive))
    messages = []
    prepare_dataset("fc100", tmp_path, tmp_path / "cache", verify=False, log=messages.append)
    train = load_split(tmp_path / "cache", "fc100", "train")
    assert train.images.shape == (180, 32, 32, 3) and train.num_classes == 60
    # Per class: train images 0, 1 then the test image 2; channel c holds 10 * c + index.
    np.testing.assert_array_equal(train.images[:3, 5, 7], [[0, 10, 20], [1, 11, 21], [2, 12, 22]])
    assert any("warning: fc100" in m and "the benchmark 600" in m for m in messages)
    assert read_manifest(tmp_path / "cache", "fc100")["source"]["sha256"] is not None


def test_non_canonical_tar_is_not_unpickled(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    _fake_cifar_tar(archive)
    with pytest.raises(ValueError, match="not the canonical cifar-100-python.tar.gz"):
        prepare_dataset("fc100", archive, tmp_path / "cache", log=_quiet)
    _no_leftovers(tmp_path / "cache")


def test_truncated_tar_is_reported(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-100-python.tar.gz"
    _fake_cifar_tar(archive)
    archive.write_bytes(archive.read_bytes()[:2000])
    monkeypatch.setattr(_cifar, "CIFAR100_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(ValueError, match="damaged or truncated"):
        prepare_dataset("cifar-fs", archive, tmp_path / "cache", log=_quiet)
    _no_leftovers(tmp_path / "cache")


@pytest.fixture
def tiny_cifar_zip(tmp_path, make_images):
    """The cifar100_png.zip layout, 2 images per class."""
    make_images(tmp_path / "png" / "cifar100", {name: 2 for name in FINE_NAMES}, size=32)
    return tmp_path / "png" / "cifar100"


def test_image_count_mismatch_is_an_error_naming_the_numbers(tiny_cifar_zip, tmp_path):
    archive = tmp_path / "cifar100.zip"
    _zip_folder(tiny_cifar_zip, archive)
    with pytest.raises(ValueError, match=r"train has 2-2 images per class, the benchmark 600"):
        prepare_dataset("cifar-fs", archive, tmp_path / "cache", log=_quiet)
    _no_leftovers(tmp_path / "cache")


def test_cifar_class_folders_in_a_plain_folder(tiny_cifar_zip, tmp_path):
    prepare_dataset("cifar-fs", tiny_cifar_zip.parent, tmp_path / "cache", verify=False, log=_quiet)
    assert _counts(tmp_path / "cache", "cifar-fs") == {
        "train": (64, {2}),
        "val": (16, {2}),
        "test": (20, {2}),
    }


def test_cifar_corrupt_png_is_named(tiny_cifar_zip, tmp_path):
    archive = tmp_path / "cifar100.zip"
    _zip_folder(tiny_cifar_zip, archive, corrupt="cifar100/otter/otter_01.png")
    with pytest.raises(ValueError, match="Cannot read image 'cifar100/otter/otter_01.png' in"):
        prepare_dataset("fc100", archive, tmp_path / "cache", verify=False, log=_quiet)
    _no_leftovers(tmp_path / "cache")


def test_cifar_missing_class_is_named(tiny_cifar_zip, tmp_path):
    shutil.rmtree(tiny_cifar_zip / "whale")
    with pytest.raises(FileNotFoundError, match="no folder of images for CIFAR-100 classes whale"):
        prepare_dataset("fc100", tiny_cifar_zip, tmp_path / "cache", log=_quiet)


def test_truncated_zip_is_reported(shared_data, tmp_path):
    archive = tmp_path / "cifar100_png.zip"
    with open(shared_data / "cifar100" / "cifar100_png.zip", "rb") as handle:
        archive.write_bytes(handle.read(100_000))
    with pytest.raises(ValueError, match="not a readable zip archive .*truncated"):
        prepare_dataset("fc100", archive, tmp_path / "cache", log=_quiet)
    _no_leftovers(tmp_path / "cache")


# --- miniImageNet and tieredImageNet: real split CSVs, tiny generated images --------------------


def _real_rows(shared_data, benchmark, split):
    folder = {"mini": "miniimagenet/splits/ravi", "tiered": "tieredimagenet/splits"}[benchmark]
    with open(shared_data / folder / f"{split}.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[1:] if benchmark == "mini" else rows


@pytest.fixture
def tiny_mini(shared_data, tmp_path):
    """The Ravi & Larochelle layout with every real class but 2 JPEGs each."""
    source = tmp_path / "mini"
    (source / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        synsets = sorted({label for _, label in _real_rows(shared_data, "mini", split)})
        with open(source / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for synset in synsets:
                for k in range(2):
                    name = f"{synset}{k:08d}.jpg"
                    mode = "L" if k else "RGB"  # any mode must become RGB
                    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).convert(
                        mode
                    ).save(source / "images" / name)
                    writer.writerow([name, synset])
    return source


def test_mini_fixture_reports_the_mismatch_and_builds_with_verify_off(tiny_mini, tmp_path):
    with pytest.raises(
        ValueError, match=r"miniimagenet: train 64 classes x 2, .* the benchmark 600"
    ):
        prepare_dataset("miniimagenet", tiny_mini, tmp_path / "cache", log=_quiet)
    _no_leftovers(tmp_path / "cache")
    prepare_dataset("miniimagenet", tiny_mini, tmp_path / "cache", verify=False, log=_quiet)
    assert _counts(tmp_path / "cache", "miniimagenet") == {
        "train": (64, {2}),
        "val": (16, {2}),
        "test": (20, {2}),
    }
    assert load_split(tmp_path / "cache", "miniimagenet", "val").images.shape == (32, 84, 84, 3)


def test_mini_csv_naming_a_missing_image(tiny_mini, tmp_path):
    victim = next((tiny_mini / "images").glob("*.jpg"))
    victim.unlink()
    with pytest.raises(
        FileNotFoundError, match=f"names {victim.name} .*copy is incomplete"
    ):
        prepare_dataset("miniimagenet", tiny_mini, tmp_path / "cache", log=_quiet)


def _as_standard_copy(tiny_mini, target):
    """The standard public copy's layout: train/ val/ test/ class folders, the CSVs beside them."""
    target.mkdir()
    for split in ("train", "val", "test"):
        shutil.copy(tiny_mini / f"{split}.csv", target / f"{split}.csv")
        with open(tiny_mini / f"{split}.csv", newline="") as handle:
            for name, label in list(csv.reader(handle))[1:]:
                (target / split / label).mkdir(parents=True, exist_ok=True)
                shutil.copy(tiny_mini / "images" / name, target / split / label / name)
    return target


def _as_by_image_copy(tiny_mini, target):
    """The second public copy's layout: train/ and val/ each hold every class, split by image."""
    for split in ("train", "val", "test"):
        with open(tiny_mini / f"{split}.csv", newline="") as handle:
            for index, (name, label) in enumerate(list(csv.reader(handle))[1:]):
                part = "train" if index % 2 == 0 else "val"
                (target / part / label).mkdir(parents=True, exist_ok=True)
                shutil.copy(tiny_mini / "images" / name, target / part / label / name)
    return target


def _mini(source, root, **kwargs):
    return prepare_dataset("miniimagenet", source, root, verify=False, log=_quiet, **kwargs)


def test_mini_both_public_layouts_give_the_images_layout_arrays(tiny_mini, tmp_path):
    standard = _as_standard_copy(tiny_mini, tmp_path / "standard")
    by_image = _as_by_image_copy(tiny_mini, tmp_path / "by_image")
    _mini(tiny_mini, tmp_path / "a")
    _mini(standard, tmp_path / "b")
    _mini(by_image, tmp_path / "c", split_dir=tiny_mini)
    for split in ("train", "val", "test"):
        reference = load_split(tmp_path / "a", "miniimagenet", split)
        for root in ("b", "c"):
            other = load_split(tmp_path / root, "miniimagenet", split)
            assert np.array_equal(other.images, reference.images)
            assert np.array_equal(other.labels, reference.labels)
    manifests = [read_manifest(tmp_path / root, "miniimagenet") for root in "abc"]
    # One digest names the pixels whatever the layout, and an unknown copy says so.
    assert len({m["source"]["content_digest"] for m in manifests}) == 1
    assert len(manifests[0]["source"]["content_digest"]) == 64
    assert all(m["source"]["sha256"] is None for m in manifests)  # a folder has no archive checksum
    assert "checked against the CSVs" in manifests[1]["protocol"]
    assert "class split rebuilt from the CSVs" in manifests[2]["protocol"]
    assert all("unknown origin" in m["protocol"] for m in manifests)


def test_mini_copies_with_other_pixels_under_the_same_names_differ(tiny_mini, tmp_path):
    standard = _as_standard_copy(tiny_mini, tmp_path / "standard")
    _mini(standard, tmp_path / "a")
    victim = next((standard / "test").rglob("*.jpg"))
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(victim)
    _mini(standard, tmp_path / "b")
    digests = [read_manifest(tmp_path / r, "miniimagenet")["source"]["content_digest"] for r in "ab"]
    assert digests[0] != digests[1]


def test_mini_by_image_copy_without_csvs_says_where_to_find_them(tiny_mini, tmp_path):
    by_image = _as_by_image_copy(tiny_mini, tmp_path / "by_image")
    with pytest.raises(FileNotFoundError, match="no test/.*--split-dir"):
        _mini(by_image, tmp_path / "cache")
    _no_leftovers(tmp_path / "cache")


def test_mini_split_dir_without_csvs_is_an_error_not_ignored(tiny_mini, tmp_path):
    standard = _as_standard_copy(tiny_mini, tmp_path / "standard")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="split file .*empty/train.csv is missing"):
        _mini(standard, tmp_path / "cache", split_dir=tmp_path / "empty")


def test_mini_images_folder_with_an_image_no_csv_names_is_refused(tiny_mini, tmp_path):
    shutil.copy(next((tiny_mini / "images").glob("*.jpg")), tiny_mini / "images" / "n0000000000000001.jpg")
    with pytest.raises(ValueError, match="1 image.*no split CSV names.*n0000000000000001.jpg"):
        _mini(tiny_mini, tmp_path / "cache")


def test_mini_standard_copy_missing_class_is_named(tiny_mini, tmp_path):
    standard = _as_standard_copy(tiny_mini, tmp_path / "standard")
    victim = sorted((standard / "val").iterdir())[3]
    shutil.rmtree(victim)
    with pytest.raises(FileNotFoundError, match=f"class {victim.name}.*copy is incomplete"):
        _mini(standard, tmp_path / "cache")
    _no_leftovers(tmp_path / "cache")


def test_mini_extra_class_is_named(tiny_mini, tmp_path):
    by_image = _as_by_image_copy(tiny_mini, tmp_path / "by_image")
    extra = by_image / "val" / "n99999999"
    extra.mkdir()
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(extra / "n9999999900000001.jpg")
    with pytest.raises(ValueError, match="class folders n99999999 are in no split CSV"):
        _mini(by_image, tmp_path / "cache", split_dir=tiny_mini)


def test_mini_image_no_csv_names_is_refused(tiny_mini, tmp_path):
    standard = _as_standard_copy(tiny_mini, tmp_path / "standard")
    folder = sorted((standard / "train").iterdir())[0]
    shutil.copy(next(folder.iterdir()), folder / f"{folder.name}00099999.jpg")
    with pytest.raises(ValueError, match=f"1 image.*no split CSV names.*{folder.name}00099999.jpg"):
        _mini(standard, tmp_path / "cache")


def test_mini_image_in_the_wrong_split_folder_is_refused(tiny_mini, tmp_path):
    standard = _as_standard_copy(tiny_mini, tmp_path / "standard")
    moved = sorted((standard / "test").iterdir())[0]
    shutil.move(moved, standard / "train" / moved.name)
    with pytest.raises(ValueError, match="test image in another split's folder"):
        _mini(standard, tmp_path / "cache")


def test_mini_corrupt_image_is_named(tiny_mini, tmp_path):
    standard = _as_standard_copy(tiny_mini, tmp_path / "standard")
    victim = next((standard / "val").rglob("*.jpg"))
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"Cannot read image .*{victim.name}"):
        _mini(standard, tmp_path / "cache")
    _no_leftovers(tmp_path / "cache")


def test_mini_split_tree_with_split_dir_absent(tmp_path, make_images):
    for split, names in {"train": ["a", "b"], "val": ["c"], "test": ["d"]}.items():
        make_images(tmp_path / "tree" / split, {n: 3 for n in names}, suffix=".jpg")
    prepare_dataset(
        "miniimagenet",
        tmp_path / "tree",
        tmp_path / "cache",
        image_size=8,
        verify=False,
        log=_quiet,
    )
    assert read_manifest(tmp_path / "cache", "miniimagenet")["splits"]["train"]["classes"] == [
        "a",
        "b",
    ]


@pytest.fixture
def tiny_tiered(shared_data, tmp_path, make_images):
    """Split CSVs with the first 2 real classes of each split; `SOURCE/train/<synset>/` x 20."""
    source, split_dir = tmp_path / "tiered", tmp_path / "tiered_splits"
    split_dir.mkdir()
    for split in ("train", "val", "test"):
        rows = _real_rows(shared_data, "tiered", split)[:2]
        (split_dir / f"{split}.csv").write_text("".join(f"{a},{b}\n" for a, b in rows))
        make_images(source / "train", {synset: 20 for synset, _ in rows}, size=6, suffix=".JPEG")
    return source, split_dir


def test_tiered_fixture_reports_class_mismatch_and_builds_with_verify_off(tiny_tiered, tmp_path):
    source, split_dir = tiny_tiered
    with pytest.raises(ValueError, match=r"train has 2 classes, the benchmark 351"):
        prepare_dataset(
            "tieredimagenet", source, tmp_path / "cache", split_dir=split_dir, log=_quiet
        )
    prepare_dataset(
        "tieredimagenet",
        source,
        tmp_path / "cache",
        split_dir=split_dir,
        image_size=12,
        verify=False,
        log=_quiet,
    )
    assert _counts(tmp_path / "cache", "tieredimagenet")["test"] == (2, {20})


def test_tiered_class_with_too_few_images(tiny_tiered, tmp_path):
    source, split_dir = tiny_tiered
    folder = next(p for p in sorted((source / "train").iterdir()))
    next(folder.iterdir()).unlink()
    with pytest.raises(ValueError, match=f"class '{folder.name}' has 19 image\\(s\\), at least 20"):
        prepare_dataset(
            "tieredimagenet",
            source,
            tmp_path / "cache",
            split_dir=split_dir,
            verify=False,
            log=_quiet,
        )


def test_tiered_missing_class_folder_and_overlap(tiny_tiered, tmp_path):
    source, split_dir = tiny_tiered
    val_first = (split_dir / "val.csv").read_text().splitlines()[0]
    shutil.rmtree(source / "train" / val_first.split(",")[0])
    with pytest.raises(
        FileNotFoundError, match=f"no image folder for classes {val_first.split(',')[0]}"
    ):
        prepare_dataset(
            "tieredimagenet", source, tmp_path / "cache", split_dir=split_dir, log=_quiet
        )
    with open(split_dir / "test.csv", "a") as handle:
        handle.write(val_first + "\n")
    with pytest.raises(
        ValueError, match=f"'val' and 'test' share 1 classes \\({val_first.split(',')[0]}\\)"
    ):
        prepare_dataset(
            "tieredimagenet", source, tmp_path / "cache", split_dir=split_dir, log=_quiet
        )


# --- folder ------------------------------------------------------------------------------------


def test_folder_split_by_class_is_seeded_and_disjoint(tmp_path, make_images):
    make_images(tmp_path / "birds", {f"class{i}": 3 for i in range(10)}, mode="L")
    messages = []
    prepare_dataset(
        "folder", tmp_path / "birds", tmp_path / "cache", image_size=8, seed=3, log=messages.append
    )
    manifest = read_manifest(tmp_path / "cache", "birds")
    assert manifest["channels"] == 1  # all grayscale stays grayscale
    classes = {s: v["classes"] for s, v in manifest["splits"].items()}
    assert [len(c) for c in classes.values()] == [6, 2, 2]
    assert sorted(sum(classes.values(), [])) == sorted(f"class{i}" for i in range(10))
    assert any("no benchmark numbers" in m for m in messages)
    prepare_dataset(
        "folder",
        tmp_path / "birds",
        tmp_path / "cache",
        image_size=8,
        seed=3,
        output_name="again",
        log=_quiet,
    )
    assert read_manifest(tmp_path / "cache", "again")["splits"] == manifest["splits"]


def test_folder_mixed_modes_become_rgb_and_rerun_is_harmless(tmp_path, make_images):
    make_images(tmp_path / "src", {"a": 2, "b": 2, "c": 2}, mode="L")
    make_images(tmp_path / "src", {"d": 2}, mode="RGB")
    for _ in range(2):
        prepare_dataset(
            "folder",
            tmp_path / "src",
            tmp_path / "cache",
            image_size=8,
            split_ratios=(0.5, 0.25, 0.25),
            log=_quiet,
        )
    assert read_manifest(tmp_path / "cache", "src")["channels"] == 3
    _no_leftovers(tmp_path / "cache", ["src"])


def test_folder_class_with_one_image_is_named(tmp_path, make_images):
    make_images(tmp_path / "src", {"a": 2, "b": 2, "lonely": 1})
    with pytest.raises(ValueError, match="class 'lonely' has 1 image\\(s\\), at least 2"):
        prepare_dataset(
            "folder",
            tmp_path / "src",
            tmp_path / "cache",
            split_ratios=(0.34, 0.33, 0.33),
            log=_quiet,
        )


def test_folder_too_few_classes_for_the_ratios(tmp_path, make_images):
    make_images(tmp_path / "src", {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="leaves no class for"):
        prepare_dataset("folder", tmp_path / "src", tmp_path / "cache", log=_quiet)
    _no_leftovers(tmp_path / "cache")


def test_folder_corrupt_file_is_named(tmp_path, make_images):
    make_images(tmp_path / "src", {"a": 2, "b": 2, "c": 2})
    (tmp_path / "src" / "b" / "b_01.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="Cannot read image .*b_01.png"):
        prepare_dataset(
            "folder",
            tmp_path / "src",
            tmp_path / "cache",
            split_ratios=(0.34, 0.33, 0.33),
            log=_quiet,
        )
    _no_leftovers(tmp_path / "cache")


def test_prepared_tiny_fixture(prepared_tiny):
    root, name = prepared_tiny
    assert _counts(root, name) == {"train": (8, {6}), "val": (5, {6}), "test": (5, {6})}


# --- arguments -----------------------------------------------------------------------------------


def test_unknown_benchmark_lists_the_known_ones(tmp_path):
    with pytest.raises(
        ValueError, match="Unknown dataset 'imagenet'; known: " + ", ".join(DATASETS)
    ):
        prepare_dataset("imagenet", tmp_path, tmp_path, log=_quiet)


def test_missing_source_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="Source .*nothing-here does not exist"):
        prepare_dataset("fc100", tmp_path / "nothing-here", tmp_path / "cache", log=_quiet)


def test_no_source_and_no_download(tmp_path):
    with pytest.raises(ValueError, match="needs a source .*or download=True"):
        prepare_dataset("omniglot", None, tmp_path, log=_quiet)


def test_folder_evaluation_only_puts_every_class_in_test(tmp_path, make_images):
    make_images(tmp_path / "glyphs", {f"class{i}": 3 for i in range(4)}, mode="L")
    prepare_dataset("folder", tmp_path / "glyphs", tmp_path / "cache", image_size=8,
                    split_ratios=(0.0, 0.0, 1.0), log=_quiet)
    manifest = read_manifest(tmp_path / "cache", "glyphs")
    assert [manifest["splits"][s]["num_images"] for s in ("train", "val", "test")] == [0, 0, 12]
    assert manifest["stats_split"] == "test" and 0 < manifest["std"][0]
    assert "evaluation only" in manifest["protocol"]
    test = load_split(tmp_path / "cache", "glyphs", "test")
    assert test.num_classes == 4 and load_split(tmp_path / "cache", "glyphs", "train").images.shape[0] == 0
    assert "train     0 classes, 0 images" in describe(tmp_path / "cache", "glyphs")


def test_folder_evaluation_only_from_the_cli(tmp_path, make_images):
    from metatransfer.cli import main

    make_images(tmp_path / "glyphs", {f"class{i}": 2 for i in range(3)})
    assert main(["data", "prepare", "folder", "--source", str(tmp_path / "glyphs"), "--root", str(tmp_path / "cache"),
                 "--image-size", "8", "--eval-only"]) == 0
    assert read_manifest(tmp_path / "cache", "glyphs")["splits"]["test"]["classes"] == ["class0", "class1", "class2"]
