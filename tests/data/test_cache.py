"""The cache format: round trip, atomic replacement, clear errors."""

import json

import numpy as np
import pytest

from metatransfer.data.cache import FORMAT_VERSION, describe, load_split, read_manifest, write_cache


def _splits(seed=0, height=4, channels=3):
    rng = np.random.default_rng(seed)
    result = {}
    for split, num_classes in (("train", 3), ("val", 2), ("test", 2)):
        labels = np.repeat(np.arange(num_classes), 2 + np.arange(num_classes))
        images = rng.integers(0, 256, (len(labels), height, height, channels), dtype=np.uint8)
        result[split] = (images, labels, [f"{split}{i}" for i in range(num_classes)])
    return result


def _write(root, name="toy", splits=None):
    return write_cache(
        root,
        name,
        splits or _splits(),
        source_path="/nowhere",
        source_sha256=None,
        protocol="toy protocol",
        options={"image_size": 4},
    )


def test_write_then_load_round_trips(tmp_path):
    splits = _splits()
    folder = _write(tmp_path, splits=splits)
    assert folder == tmp_path / "toy"
    for split, (images, labels, names) in splits.items():
        loaded = load_split(tmp_path, "toy", split)
        assert isinstance(loaded.images, np.memmap)
        np.testing.assert_array_equal(loaded.images, images)
        np.testing.assert_array_equal(loaded.labels, labels)
        assert loaded.labels.dtype == np.int64
        assert loaded.class_names == names and loaded.num_classes == len(names)
        assert (loaded.dataset, loaded.split) == ("toy", split)
    train = splits["train"][0] / 255.0
    np.testing.assert_allclose(loaded.mean, train.mean(axis=(0, 1, 2)), atol=1e-9)
    np.testing.assert_allclose(loaded.std, train.std(axis=(0, 1, 2)), atol=1e-9)


def test_manifest_has_the_documented_fields(tmp_path):
    _write(tmp_path)
    manifest = read_manifest(tmp_path, "toy")
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["image_size"] == [4, 4] and manifest["channels"] == 3
    assert manifest["splits"]["train"] == {
        "classes": ["train0", "train1", "train2"],
        "num_images": 9,
        "images_per_class": [2, 3, 4],
    }
    assert manifest["source"] == {"path": "/nowhere", "sha256": None}
    assert manifest["protocol"] == "toy protocol" and manifest["options"] == {"image_size": 4}
    assert len(manifest["mean"]) == len(manifest["std"]) == 3


def test_missing_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"No prepared dataset 'fc100' in .*mtl data prepare fc100"
    ):
        load_split(tmp_path, "fc100", "train")


def test_unknown_split_is_rejected(tmp_path):
    _write(tmp_path)
    with pytest.raises(ValueError, match="Unknown split 'dev'"):
        load_split(tmp_path, "toy", "dev")


def test_wrong_format_version_is_rejected(tmp_path):
    _write(tmp_path)
    path = tmp_path / "toy" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version 99"):
        load_split(tmp_path, "toy", "train")


def test_arrays_disagreeing_with_manifest_are_rejected(tmp_path):
    _write(tmp_path)
    np.save(tmp_path / "toy" / "val" / "labels.npy", np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="Damaged cache .*val.*images_per_class"):
        load_split(tmp_path, "toy", "val")


def test_grayscale_keeps_one_channel(tmp_path):
    _write(tmp_path, splits=_splits(channels=1))
    assert load_split(tmp_path, "toy", "test").images.shape[1:] == (4, 4, 1)
    assert len(read_manifest(tmp_path, "toy")["mean"]) == 1


def test_rewrite_replaces_the_cache(tmp_path):
    _write(tmp_path, splits=_splits(seed=0))
    new = _splits(seed=1)
    _write(tmp_path, splits=new)
    np.testing.assert_array_equal(load_split(tmp_path, "toy", "train").images, new["train"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_failed_write_leaves_old_cache_and_no_temp(tmp_path):
    old = _splits(seed=0)
    _write(tmp_path, splits=old)
    bad = _splits(seed=1)
    images, labels, names = bad["test"]
    bad["test"] = (images, labels[::-1].copy(), names)  # unsorted labels
    with pytest.raises(ValueError, match="labels must be sorted"):
        _write(tmp_path, splits=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
    np.testing.assert_array_equal(load_split(tmp_path, "toy", "train").images, old["train"][0])


def test_missing_split_fails_without_leftovers(tmp_path):
    splits = _splits()
    del splits["val"]
    with pytest.raises(ValueError, match="'val' is missing"):
        _write(tmp_path, splits=splits)
    assert list(tmp_path.iterdir()) == []


def test_describe_lists_protocol_splits_and_stats(tmp_path):
    _write(tmp_path)
    text = describe(tmp_path, "toy")
    assert "toy protocol" in text
    assert "train     3 classes, 9 images (2-4 per class)" in text
    assert "val       2 classes, 5 images (2-3 per class)" in text
    assert "4x4, 3 channel(s)" in text and "mean" in text and "std" in text


def test_temp_folders_of_dead_runs_are_removed(tmp_path):
    stale = tmp_path / ".toy.tmp-999999999"  # no such process
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    _write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
