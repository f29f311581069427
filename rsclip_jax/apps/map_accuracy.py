"""How good is a class map? Pixel accuracy against reference polygons (e.g. OpenStreetMap land use).

The polygons are rasterised onto the map's grid (a pixel belongs to a polygon when its centre
does, as GDAL rasterises) strip by strip, so memory stays bounded for large maps. Only pixels
inside a polygon whose class the map knows are scored ("the labelled area"); the map's nodata
there counts as wrong. The baseline is the majority class: always answering the most common
reference class of the labelled area.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import rasterio
from rasterio.features import rasterize
from rasterio.windows import Window

STRIP_ROWS = 1024


def map_accuracy(class_map: str, truth: str, field: str, labels: Sequence[str],
                 truth_to_label: Mapping[str, str] | None = None) -> dict:
    """Scores `class_map` (values 1..C for `labels`) against the polygons of `truth`.

    Args:
        truth: a vector file (GeoPackage, GeoJSON, Shapefile); reprojected to the map's CRS.
        field: the attribute holding each polygon's class.
        truth_to_label: reference value -> label (e.g. {"farm": "farmland"}); default: values
            equal to labels. Polygons of other values are not scored.

    Returns:
        {"accuracy", "majority_class", "majority_accuracy", "balanced_accuracy", "labelled_pixels",
         "per_class": {label: {"pixels", "recall"}}, "confusion": C x (C+1) counts, the last
         column being nodata}.

    Raises:
        ValueError: naming the file and field, for a missing field or no polygon of a known class.
    """
    import geopandas as gpd  # heavy: only when a map is scored

    frame = gpd.read_file(truth)
    if field not in frame.columns:
        fields = ", ".join(c for c in frame.columns if c != "geometry")
        raise ValueError(f"{truth}: no field {field!r}; it has {fields}")
    mapping = dict(truth_to_label) if truth_to_label is not None else {label: label for label in labels}
    unknown = sorted(set(mapping.values()) - set(labels))
    if unknown:
        raise ValueError(f"truth classes map to {unknown}, which are not among the map's labels {list(labels)}")
    value_of = {label: i + 1 for i, label in enumerate(labels)}
    with rasterio.open(class_map) as ds:
        if ds.crs is not None and frame.crs is not None:
            frame = frame.to_crs(ds.crs)
        shapes = [(geom, value_of[mapping[v]]) for geom, v in zip(frame.geometry, frame[field].astype(str))
                  if v in mapping and geom is not None and not geom.is_empty]
        if not shapes:
            raise ValueError(f"{truth}: no polygon with a {field} of {sorted(mapping)}")
        C = len(labels)
        confusion = np.zeros((C, C + 1), np.int64)
        for row in range(0, ds.height, STRIP_ROWS):
            win = Window(0, row, ds.width, min(STRIP_ROWS, ds.height - row))
            pred = ds.read(1, window=win).astype(np.int64)
            ref = rasterize(shapes, out_shape=pred.shape, transform=ds.window_transform(win), fill=0, dtype=np.uint8)
            labelled = ref > 0
            pred = np.where((pred >= 1) & (pred <= C), pred, C + 1)  # nodata and foreign values: the last column
            np.add.at(confusion, (ref[labelled].astype(np.int64) - 1, pred[labelled] - 1), 1)
    per_class_pixels = confusion.sum(axis=1)
    total = int(per_class_pixels.sum())
    recall = np.divide(np.diag(confusion[:, :C]), per_class_pixels, out=np.zeros(C), where=per_class_pixels > 0)
    majority = int(per_class_pixels.argmax())
    present = per_class_pixels > 0
    return {
        "accuracy": float(np.trace(confusion[:, :C]) / total),
        "majority_class": labels[majority],
        "majority_accuracy": float(per_class_pixels[majority] / total),
        "balanced_accuracy": float(recall[present].mean()),
        "labelled_pixels": total,
        "per_class": {label: {"pixels": int(n), "recall": float(r)}
                      for label, n, r in zip(labels, per_class_pixels, recall)},
        "confusion": confusion.tolist(),
    }


def parse_truth_classes(text: str | None) -> dict[str, str] | None:
    """`--truth-classes "farm=farmland,forest=forest"` -> {"farm": "farmland", "forest": "forest"}."""
    if text is None:
        return None
    out = {}
    for part in text.split(","):
        value, sep, label = part.partition("=")
        if not sep or not value.strip() or not label.strip():
            raise ValueError(f"--truth-classes {text!r}: give VALUE=LABEL pairs separated by commas, "
                             "e.g. farm=farmland,forest=forest")
        out[value.strip()] = label.strip()
    return out


def format_accuracy(result: dict) -> str:
    """A few lines for the terminal: accuracy against the majority baseline, and recall per class."""
    lines = [f"pixel accuracy {100 * result['accuracy']:.1f}% over {result['labelled_pixels']} labelled pixels "
             f"(majority class '{result['majority_class']}': {100 * result['majority_accuracy']:.1f}%; "
             f"balanced accuracy {100 * result['balanced_accuracy']:.1f}%)"]
    lines += [f"  {label}: recall {100 * v['recall']:.1f}% of {v['pixels']} px"
              for label, v in result["per_class"].items()]
    return "\n".join(lines)
