"""`metatransfer.loading` sits below `api` and `export`: it imports neither, and reads bundles with clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from metatransfer.loading import BUNDLE_FILE, read_bundle


def test_loading_imports_neither_api_nor_export():
    code = "import sys, metatransfer.loading; print('metatransfer.export' in sys.modules, 'metatransfer.api' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_api_does_not_import_export():
    code = "import sys, metatransfer.api; print('metatransfer.export' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False"]


def test_preprocessing_is_one_class_for_api_and_loading():
    from metatransfer.api import Preprocessing
    from metatransfer.loading import Preprocessing as LoadingPreprocessing

    assert Preprocessing is LoadingPreprocessing


def test_read_bundle_without_bundle_json_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=BUNDLE_FILE) as error:
        read_bundle(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_read_bundle_of_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_bundle(tmp_path / "nowhere")
