"""`mtl predict`: classify a folder of query images from a folder of labelled support examples.

    SUPPORT/<class name>/<image>      at least 2 classes, at least 1 image each
    QUERY/<image> or QUERY/<class>/<image> or image files   class folders named like support
                                                            classes give an accuracy

The model (a run directory or an `mtl export` bundle) is fine-tuned on the support set by
`FewShotClassifier.fit`; every query gets its predicted class, probability and top-k classes,
written as CSV or JSON (by the suffix of `out`), and a summary is printed.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from metatransfer.api import FewShotClassifier
from metatransfer.data._decode import is_image_name

__all__ = ["ImageList", "read_support", "read_queries", "prediction_rows", "write_predictions", "predict_folders"]

OUTPUT_SUFFIXES = (".csv", ".json")


@dataclass
class ImageList:
    """Image files with their class (the folder name; None when unlabelled) and skipped files."""

    paths: list[Path] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # files without an image suffix


def _visible(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def _add_files(found: ImageList, folder: Path, label: str | None) -> int:
    count = 0
    for path in _visible(folder):
        if path.is_file() and is_image_name(path.name):
            found.paths.append(path)
            found.labels.append(label)
            count += 1
        elif path.is_file():
            found.skipped.append(path)
    return count


def read_support(folder: str | Path) -> ImageList:
    """`SUPPORT/<class>/<image>` -> image paths and their class names, classes in sorted order.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: images outside class folders, an empty class folder, or fewer than 2 classes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Support folder {folder} does not exist; it must hold one folder of images per class")
    loose = [path.name for path in _visible(folder) if path.is_file() and is_image_name(path.name)]
    if loose:
        raise ValueError(
            f"Support folder {folder} has images outside class folders ({', '.join(loose[:5])}); "
            f"put each class's images in SUPPORT/<class name>/"
        )
    found = ImageList()
    class_dirs = [path for path in _visible(folder) if path.is_dir()]
    for class_dir in class_dirs:
        if _add_files(found, class_dir, class_dir.name) == 0:
            raise ValueError(f"Support class folder {class_dir} holds no images; add at least one or remove the folder")
    if len(class_dirs) < 2:
        names = ", ".join(path.name for path in class_dirs) or "none"
        raise ValueError(f"Support folder {folder} has {len(class_dirs)} class folder(s) ({names}); few-shot classification needs at least 2")
    return found


def read_queries(items: Sequence[str | Path]) -> ImageList:
    """Query files and folders: a folder's own images are unlabelled, its subfolders' images are
    labelled with the subfolder name. Explicitly named files are used whatever their suffix.

    Raises:
        FileNotFoundError: a named file or folder does not exist.
        ValueError: no query image found.
    """
    found = ImageList()
    for item in map(Path, items):
        if item.is_file():
            found.paths.append(item)
            found.labels.append(None)
        elif item.is_dir():
            _add_files(found, item, None)
            for class_dir in (path for path in _visible(item) if path.is_dir()):
                _add_files(found, class_dir, class_dir.name)
        else:
            raise FileNotFoundError(f"Query {item} does not exist")
    if not found.paths:
        raise ValueError(f"No query images in {', '.join(map(str, items))}")
    return found


def prediction_rows(
    paths: Sequence[Path], probabilities: np.ndarray, classes: Sequence[str], truths: Sequence[str | None], top_k: int
) -> list[dict[str, Any]]:
    """One dict per query: query, true, predicted, probability, top_k [{class, probability}]."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    rows = []
    for path, row, ranks, truth in zip(paths, probabilities, order, truths):
        rows.append({
            "query": str(path), "true": truth, "predicted": classes[ranks[0]], "probability": round(float(row[ranks[0]]), 6),
            "top_k": [{"class": classes[i], "probability": round(float(row[i]), 6)} for i in ranks],
        })
    return rows


def write_predictions(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """CSV (one line per query, top-k as top1..topK columns) or JSON (summary + rows), by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({**summary, "predictions": rows}, indent=2))
        return
    top_k = max(len(row["top_k"]) for row in rows)
    header = ["query", "true", "predicted", "probability"]
    for rank in range(1, top_k + 1):
        header += [f"top{rank}", f"top{rank}_probability"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            line = [row["query"], row["true"] or "", row["predicted"], row["probability"]]
            for entry in row["top_k"]:
                line += [entry["class"], entry["probability"]]
            writer.writerow(line)


def _accuracy(rows: list[dict[str, Any]], classes: Sequence[str]) -> tuple[dict[str, Any] | None, int]:
    """Accuracy over queries whose folder names a support class; also the count of other labelled ones."""
    labelled = [row for row in rows if row["true"] in classes]
    foreign = sum(1 for row in rows if row["true"] is not None and row["true"] not in classes)
    if not labelled:
        return None, foreign
    per_class = {}
    for name in classes:
        mine = [row for row in labelled if row["true"] == name]
        if mine:
            per_class[name] = round(100 * sum(row["predicted"] == name for row in mine) / len(mine), 2)
    correct = sum(row["predicted"] == row["true"] for row in labelled)
    return {"accuracy": round(100 * correct / len(labelled), 2), "correct": correct, "labelled": len(labelled), "per_class": per_class}, foreign


def _format_table(rows: list[dict[str, Any]]) -> list[str]:
    width = min(60, max(len(row["query"]) for row in rows))
    lines = []
    for row in rows:
        top = ", ".join(f"{entry['class']} {entry['probability']:.2f}" for entry in row["top_k"])
        mark = "" if row["true"] is None else ("  ok" if row["true"] == row["predicted"] else f"  (true: {row['true']})")
        name = row["query"] if len(row["query"]) <= width else "..." + row["query"][3 - width :]
        lines.append(f"{name:<{width}}  {row['predicted']}  {row['probability']:.3f}  [{top}]{mark}")
    return lines


def predict_folders(
    model: str | Path,
    support: str | Path,
    queries: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    top_k: int = 3,
    data_root: str | Path | None = None,
    device: str = "auto",
    checkpoint: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit a model on SUPPORT's class folders, predict the queries, write `out`, print a summary;
    `checkpoint` picks a run directory's meta_train checkpoint (default best).

    Returns:
        The summary (model, classes, accuracy or None, ...) with the per-query rows under "predictions".
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out_path}: use a .csv or a .json file name")
    support_set = read_support(support)
    query_set = read_queries(queries)
    classifier = FewShotClassifier.load(model, data_root=data_root, device=device, checkpoint=checkpoint)
    classifier.fit(support_set.paths, support_set.labels)
    classes = [str(name) for name in classifier.classes_]
    probabilities = classifier.predict_proba(query_set.paths)
    rows = prediction_rows(query_set.paths, probabilities, classes, query_set.labels, min(top_k, len(classes)))
    accuracy, foreign = _accuracy(rows, classes)
    counts = Counter(support_set.labels)
    summary = {
        "model": classifier.info.get("source", str(model)),
        "support": str(support), "classes": classes, "support_images_per_class": [counts[name] for name in classes],
        "queries": len(rows), "top_k": min(top_k, len(classes)), "accuracy": accuracy,
        "base_learner": {"steps": classifier.steps, "lr": classifier.lr}, "flip_average": classifier.flip_average,
        "shift_views": classifier.shift_views,
    }
    if out_path is not None:
        write_predictions(out_path, rows, summary)
    else:
        for line in _format_table(rows):
            log(line)
    skipped = support_set.skipped + query_set.skipped
    log(f"model      {summary['model']}")
    log(f"support    {len(classes)} classes, {len(support_set.paths)} images ({', '.join(f'{c} {n}' for c, n in zip(classes, summary['support_images_per_class']))})")
    predicted = Counter(row["predicted"] for row in rows)
    log(f"queries    {len(rows)} images; predicted: {', '.join(f'{name} {predicted[name]}' for name in classes if predicted[name])}")
    if accuracy is not None:
        per_class = ", ".join(f"{name} {value:.0f}%" for name, value in accuracy["per_class"].items())
        log(f"accuracy   {accuracy['accuracy']:.2f}% ({accuracy['correct']}/{accuracy['labelled']} queries in class folders; {per_class})")
    if foreign:
        log(f"note       {foreign} queries sit in folders that name no support class; they count in no accuracy")
    if skipped:
        log(f"note       skipped {len(skipped)} non-image file(s): {', '.join(str(path) for path in skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    if out_path is not None:
        log(f"written    {out_path}")
    return {**summary, "predictions": rows}
