"""FewShotClassifier: image preparation, fit/predict on a smoke run, agreement with meta-test, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_run import CLASSES, N_QUERY, N_SHOT, fc100_folders, smoke_run  # noqa: F401  (fixtures)
from metatransfer import FewShotClassifier
from metatransfer.api import Preprocessing, load_image
from metatransfer.data.cache import load_split, read_manifest
from metatransfer.data.episodes import TaskIndices
from metatransfer.features import FeatureSettings, extract_features

RGB32 = Preprocessing(image_size=32, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
INK28 = Preprocessing(image_size=28, channels=1, mean=(0.1,), std=(0.3,), invert=True)


def _folder_images(folder: Path) -> tuple[list[Path], list[str]]:
    paths = sorted(folder.glob("*/*.png"))
    return paths, [path.parent.name for path in paths]


@pytest.fixture(scope="module")
def model(smoke_run: Path) -> FewShotClassifier:  # noqa: F811
    return FewShotClassifier.from_run(smoke_run, device="cpu")


# --- image preparation ---------------------------------------------------------------------------


def test_user_png_is_prepared_exactly_like_the_cache(prepared_fc100, fc100_folders):  # noqa: F811
    root, name = prepared_fc100
    split = load_split(root, name, "test")
    path = fc100_folders[0] / "dolphin" / "dolphin_003.png"
    first = int(np.flatnonzero(split.labels == split.class_names.index("dolphin"))[0])
    preprocessing = Preprocessing.from_manifest(read_manifest(root, name))
    np.testing.assert_array_equal(load_image(path, preprocessing), split.images[first + 3])


def test_omniglot_manifest_means_inverted_inputs():
    manifest = {"dataset": "omniglot", "image_size": [28, 28], "channels": 1, "mean": [0.08], "std": [0.27],
                "options": {"benchmark": "omniglot"}}
    assert Preprocessing.from_manifest(manifest).invert
    assert not Preprocessing.from_manifest({**manifest, "options": {"benchmark": "folder"}}).invert


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "LA", "I;16"])
def test_any_mode_and_size_becomes_the_model_format(tmp_path, mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert(mode)
    for item in (image, _save(image, tmp_path / "x.png")):
        for preprocessing, shape in ((RGB32, (32, 32, 3)), (INK28, (28, 28, 1))):
            array = load_image(item, preprocessing)
            assert array.shape == shape and array.dtype == np.uint8


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_transparent_pixels_become_white_and_ink_is_inverted():
    clear = np.zeros((28, 28, 4), dtype=np.uint8)  # fully transparent black
    clear[10:18, 10:18] = (0, 0, 0, 255)  # an opaque black stroke
    rgb = load_image(clear, RGB32)
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[16, 16].tolist() == [0, 0, 0]
    ink = load_image(clear, INK28)  # grayscale, inverted as the Omniglot cache: ink bright on dark
    assert ink[0, 0, 0] == 0 and ink[14, 14, 0] == 255


def test_arrays_of_every_layout_are_accepted():
    for shape in ((32, 32), (32, 32, 1), (32, 32, 3), (32, 32, 4), (9, 40, 3)):
        assert load_image(np.full(shape, 7, dtype=np.uint8), RGB32).shape == (32, 32, 3)


def test_bad_images_fail_with_the_file_named(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        load_image(fake, RGB32)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png", RGB32)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((8, 8, 3), dtype=np.float32), RGB32)
    with pytest.raises(ValueError, match="int"):
        load_image(3, RGB32)


# --- fit and predict -----------------------------------------------------------------------------


def test_fit_predict_on_folders_of_real_images(model, fc100_folders):  # noqa: F811
    support, labels = _folder_images(fc100_folders[0])
    queries, truths = _folder_images(fc100_folders[1])
    with torch.no_grad():  # a user's no_grad: the closed-form inner loop needs no autograd
        model.fit(support, labels)
        probabilities = model.predict_proba(queries)
    assert model.classes_ == sorted(CLASSES)
    assert probabilities.shape == (len(CLASSES) * N_QUERY, len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    predicted = model.predict(queries)
    assert set(predicted) <= set(CLASSES)
    assert predicted == [model.classes_[i] for i in probabilities.argmax(axis=1)]
    assert len(truths) == len(predicted) == len(CLASSES) * N_QUERY


def test_paths_pil_images_and_arrays_give_the_same_result(model, fc100_folders):  # noqa: F811
    support, labels = _folder_images(fc100_folders[0])
    queries = _folder_images(fc100_folders[1])[0][:7]
    model.fit(support, labels)
    from_paths = model.predict_proba(queries)
    pil = [Image.open(path) for path in queries]
    arrays = [np.asarray(image.convert("RGB")) for image in pil]
    np.testing.assert_allclose(model.predict_proba(pil), from_paths, atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(arrays), from_paths, atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(np.stack(arrays)), from_paths, atol=1e-6)


def test_any_number_of_classes_and_hashable_labels(model, fc100_folders):  # noqa: F811
    support, labels = _folder_images(fc100_folders[0])
    keep = [i for i, label in enumerate(labels) if label in ("bee", "fox", "whale")][:-2]  # 3 classes, uneven shots
    codes = {"bee": 30, "fox": 10, "whale": 20}
    model.fit([support[i] for i in keep], [codes[labels[i]] for i in keep])
    assert model.classes_ == [10, 20, 30]
    assert model.predict_proba(support[:4]).shape == (4, 3)
    assert set(model.predict(support[:4])) <= {10, 20, 30}


def test_classifier_agrees_with_the_meta_test_protocol(smoke_run, prepared_fc100):  # noqa: F811
    """The same 5-way 5-shot task scored by meta-test's `FewShotModel.score` and by fit/predict."""
    root, name = prepared_fc100
    split = load_split(root, name, "test")
    model = FewShotClassifier.from_run(smoke_run, device="cpu")
    rng = np.random.default_rng(0)
    classes = rng.choice(split.num_classes, 5, replace=False)
    per_class = [rng.choice(np.flatnonzero(split.labels == c), N_SHOT + N_QUERY, replace=False) for c in classes]
    support = np.concatenate([indices[:N_SHOT] for indices in per_class])
    query = np.concatenate([indices[N_SHOT:] for indices in per_class])
    images = split.images[np.concatenate([support, query])]  # features of the task's images only
    positions = np.arange(len(images))
    tasks = TaskIndices(positions[None, : len(support)], positions[None, len(support) :], classes[None], 5, N_SHOT, N_QUERY)
    features = extract_features(model.backbone, images, FeatureSettings(mean=model.preprocessing.mean, std=model.preprocessing.std))
    expected = model.model.score(features, tasks)[0]
    labels = np.repeat(np.arange(5), N_SHOT)
    model.fit(split.images[support], labels)
    predicted = np.asarray(model.predict(split.images[query]))
    assert np.mean(predicted == np.repeat(np.arange(5), N_QUERY)) == pytest.approx(expected)


# --- bad input -----------------------------------------------------------------------------------


def test_fit_needs_two_classes_and_matching_labels(model, fc100_folders):  # noqa: F811
    support, labels = _folder_images(fc100_folders[0])
    with pytest.raises(ValueError, match="at least 2 classes"):
        model.fit(support[:3], ["bee"] * 3)
    with pytest.raises(ValueError, match="3 support images but 2 labels"):
        model.fit(support[:3], ["bee", "fox"])


def test_predict_before_fit_says_so(smoke_run):  # noqa: F811
    with pytest.raises(RuntimeError, match="fit"):
        FewShotClassifier.from_run(smoke_run, device="cpu").predict(np.zeros((1, 32, 32, 3), np.uint8))


def test_load_tells_run_dirs_from_nothing(smoke_run, tmp_path):  # noqa: F811
    assert FewShotClassifier.load(smoke_run, device="cpu").info["checkpoint"] == "meta_train/best"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FewShotClassifier.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        FewShotClassifier.load(tmp_path)


def test_moved_data_is_reported_with_the_way_out(smoke_run, prepared_fc100, tmp_path):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="--data-root"):
        FewShotClassifier.from_run(smoke_run, data_root=tmp_path)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "fc100").symlink_to(prepared_fc100[0] / "fc100")
    assert FewShotClassifier.from_run(smoke_run, data_root=moved, device="cpu").preprocessing.image_size == 32


def test_run_without_checkpoints_is_reported(smoke_run, tmp_path):  # noqa: F811
    shutil.copy(smoke_run / "config.yaml", tmp_path / "config.yaml")
    with pytest.raises(FileNotFoundError, match="no meta_train/best nor pretrain/best"):
        FewShotClassifier.from_run(tmp_path)
