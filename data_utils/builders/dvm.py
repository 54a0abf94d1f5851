"""DVM-CAR (car adverts, 286 car-model classes) -> stil dataset, from two kinds of input.

* `build_dvm_prepared`: TIP's prepared ``features/`` files (reordered CSVs without header, ``.pt``
  label/path lists, optional low-data subset files). Their continuous values are **already
  z-scored by TIP** (global statistics for 9 columns, per-file statistics for the 4 physical ones)
  and are stored as given; the schema's statistics (fitted on train) are then close to 0/1.
  Category names are not in those files: vocabularies are the codes "0".."card-1".
* `build_dvm_raw`: the raw DVM-CAR download (``tables_V2.0/*.csv`` + ``resized_DVM/``), with the
  TIP notebook's joins, cleaning, class filter, split and physical-dimension jitter reimplemented,
  but raw values stored and vocabularies/statistics persisted (schema fitted on train).

`dvm_low_data_indices` / `dvm_low_data_subsets` implement TIP's 10 % / 1 % low-data protocol.
See docs/data.md for every decision and what is inferred.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import DatasetMetadata
from ..schema import TabularSchema
from ._common import (
    BuildError,
    check_continuous,
    check_output_free,
    check_tip_columns,
    load_pt,
    make_features,
    read_image_file,
    read_npy_image,
    write_dataset,
)

DVM_CATEGORICAL = ["Color", "Bodytype", "Gearbox", "Fuel_type"]
DVM_PHYSICAL = ["Wheelbase", "Height", "Width", "Length"]
DVM_BASE_CONTINUOUS = ["Adv_year", "Adv_month", "Reg_year", "Runned_Miles", "Price", "Seat_num", "Door_num",
                       "Entry_price", "Engine_size"]
DVM_CONTINUOUS = DVM_PHYSICAL + DVM_BASE_CONTINUOUS
DVM_COLUMNS = DVM_CATEGORICAL + DVM_CONTINUOUS  # TIP's "reordered" order
PREPARED_SPLITS = {"train": "train", "validation": "val", "test": "test"}
SUBSETS = ("0.1", "0.01")


def prepared_files(split: str, subset: str = "") -> dict[str, str]:
    """TIP's prepared file names for ``split`` (train/val/test); ``subset`` is '' or '_0.1'/'_0.01'."""
    return {
        "features": f"dvm_features_{split}_noOH_all_views{subset}_physical_jittered_50_reordered.csv",
        "labels": f"labels_model_all_{split}_all_views{subset}.pt",
        "paths": f"{split}_paths_all_views{subset}.pt",
        "ids": f"{split}_ids_all_views{subset}.pt",
    }


LENGTHS_FILE = "tabular_lengths_all_views_physical_reordered.pt"


# ------------------------------------------------------------------------------ low-data protocol
def dvm_low_data_indices(labels: Sequence[int], fraction: float = 0.1, seed: int = 2023) -> np.ndarray:
    """TIP's low-data subset of rows (positions, sorted = table order).

    The first row of every class is kept ("critical" rows), then the subset is filled up to
    ``int(fraction * N)`` rows with ``sklearn.model_selection.train_test_split(..., random_state=seed)``
    over the remaining rows, stratified by class when the fill is at least the number of classes.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    n = labels.size
    if n == 0:
        raise BuildError("cannot draw a low-data subset from an empty split")
    _, first = np.unique(labels, return_index=True)
    critical = np.sort(first)
    others = np.setdiff1d(np.arange(n), critical)
    fill = int(n * fraction) - critical.size
    chosen = np.empty(0, dtype=np.int64)
    if fill > 0:
        num_classes = np.unique(labels).size
        stratify = labels[others] if fill >= num_classes else None
        try:
            _, chosen = train_test_split(others, test_size=fill, random_state=seed, stratify=stratify)
        except ValueError as error:
            raise BuildError(f"low-data subset ({fraction:g} of {n} rows): {error}") from None
    return np.sort(np.concatenate([critical, np.asarray(chosen, dtype=np.int64)]))


def dvm_low_data_subsets(labels: Sequence[int], seed: int = 2023) -> dict[str, np.ndarray]:
    """The papers' subsets: "0.1" = protocol on train; "0.01" = the protocol again on the 10 % rows."""
    labels = np.asarray(labels)
    ten = dvm_low_data_indices(labels, 0.1, seed)
    one = ten[dvm_low_data_indices(labels[ten], 0.1, seed)]
    return {"0.1": ten, "0.01": one}


def _check_subset_name(labeled_subset: str | None) -> None:
    if labeled_subset is not None and str(labeled_subset) not in SUBSETS:
        raise BuildError(f"--labeled-subset must be one of {SUBSETS}, got {labeled_subset!r}")


# ------------------------------------------------------------------------------ prepared files
def _resolve_image(path: str, features_dir: Path, images_root: Path | None, image_format: str) -> tuple[Path, str]:
    p = Path(path)
    if images_root is not None:
        parts = p.parts
        rel = Path(*parts[parts.index("resized_DVM") + 1:]) if "resized_DVM" in parts else Path(p.name)
        p = images_root / rel
    elif not p.is_absolute():
        p = features_dir / p
    jpg, npy = p, p.with_suffix(".npy")
    if image_format == "jpg":
        return jpg, "file"
    if image_format == "npy":
        return npy, "npy"
    return (jpg, "file") if jpg.is_file() or not npy.is_file() else (npy, "npy")


def _load_image(source, where):
    path, kind = source
    return read_npy_image(path, where) if kind == "npy" else read_image_file(path, where, mode="RGB")


def _check_image_sources(sources, where):
    for i, (path, _) in enumerate(sources):
        if not Path(path).is_file():
            raise BuildError(f"{where} row {i}: image file {path} does not exist; fix --images-root/--image-format "
                             "or regenerate the files")


def build_dvm_prepared(
    features_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    labeled_subset: str | None = None,
    labeled_source: str = "files",
    image_format: str = "auto",
    images_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """TIP's prepared DVM files -> stil dataset (values stored as given: already z-scored by TIP)."""
    import datasets
    import pandas as pd

    check_output_free(output, overwrite)
    _check_subset_name(labeled_subset)
    if image_format not in ("auto", "jpg", "npy"):
        raise BuildError(f"--image-format must be auto, jpg or npy, got {image_format!r}")
    features_dir = Path(features_dir)
    images_root = Path(images_root) if images_root else None
    lengths = load_pt(features_dir / LENGTHS_FILE)
    lengths = [int(x) for x in lengths]
    expected_pattern = len(lengths) == 17 and all(x > 1 for x in lengths[:4]) and all(x == 1 for x in lengths[4:])
    if not expected_pattern:
        raise BuildError(f"{features_dir / LENGTHS_FILE}: field lengths {lengths} are not DVM's reordered layout "
                         "(4 categorical lengths > 1, then 13 ones)")
    cardinalities = dict(zip(DVM_CATEGORICAL, lengths[:4]))

    tables, labels, sources = {}, {}, {}
    for split, tip in PREPARED_SPLITS.items():
        names = prepared_files(tip)
        csv = features_dir / names["features"]
        if not csv.is_file():
            raise BuildError(f"missing file {csv}; point --features-dir at TIP's prepared features folder")
        df = pd.read_csv(csv, header=None)
        if df.shape[1] != len(lengths):
            raise BuildError(f"{csv} has {df.shape[1]} columns but {LENGTHS_FILE} lists {len(lengths)} fields; "
                             "use the *_reordered.csv files with their lengths file")
        lab = load_pt(features_dir / names["labels"])
        paths = load_pt(features_dir / names["paths"])
        if not (len(df) == len(lab) == len(paths)):
            raise BuildError(f"{split}: the table and images do not match: {names['features']} has {len(df)} rows, "
                             f"{names['labels']} {len(lab)} labels, {names['paths']} {len(paths)} paths; "
                             "regenerate the files together")
        seen: dict[str, int] = {}
        for i, p in enumerate(paths):
            if str(p) in seen:
                raise BuildError(f"{features_dir / names['paths']} rows {seen[str(p)]} and {i}: duplicated image "
                                 f"path {p}; each advert needs its own image")
            seen[str(p)] = i
        tables[split] = check_tip_columns(df, DVM_COLUMNS, lengths, str(csv), LENGTHS_FILE)
        labels[split] = [int(x) for x in lab]
        sources[split] = [_resolve_image(str(p), features_dir, images_root, image_format) for p in paths]
        _check_image_sources(sources[split], f"{features_dir / names['paths']}")

    num_classes = _check_labels(labels, features_dir)
    train_n = len(labels["train"])
    mask, subset_info = np.ones(train_n, dtype=bool), {"all_labeled": True}
    if labeled_subset is not None:
        mask, subset_info = _prepared_subset_mask(features_dir, str(labeled_subset), labeled_source, labels["train"],
                                                  [str(p) for p in load_pt(features_dir / prepared_files("train")["paths"])])
    if not mask.any():
        raise BuildError("the labelled set is empty; check the subset files")
    absent = sorted(set(labels["train"]) - set(np.asarray(labels["train"])[mask].tolist()))
    if absent:
        raise BuildError(f"classes {absent[:20]} have no labelled training row in the {labeled_subset} subset; "
                         "the subset files do not match the train split")

    schema = TabularSchema.fit(
        {c: tables["train"][c] for c in DVM_CONTINUOUS}, categorical=DVM_CATEGORICAL, continuous=DVM_CONTINUOUS,
        categories={c: [str(k) for k in range(cardinalities[c])] for c in DVM_CATEGORICAL},
    )
    names = [str(k) for k in range(num_classes)]
    features = make_features(schema, datasets.ClassLabel(names=names))
    splits = {}
    for split in PREPARED_SPLITS:
        rows = {"image": sources[split], "label": labels[split], **tables[split]}
        rows["labeled"] = mask.tolist() if split == "train" else [False] * len(labels[split])
        splits[split] = rows
    metadata = DatasetMetadata(
        task="classification", label_names=names, labeled_indices=np.flatnonzero(mask).tolist(),
        split_info={"protocol": "dvm-tip-low-data" if labeled_subset else "all-labeled", "subset": labeled_subset,
                    "seed": 2023, **subset_info},
        source={"builder": "dvm_prepared", "features_dir": str(features_dir), "image_format": image_format,
                "values": "as given by TIP (already z-scored: 9 columns globally, 4 physical per file); "
                          "categorical vocabularies are TIP's integer codes",
                "label_order": "TIP's Genmodel_ID first-appearance index"},
    )
    return write_dataset(splits, features, output, metadata, schema=schema, overwrite=overwrite,
                         image_loader=_load_image, progress=progress)


def _check_labels(labels: dict[str, list[int]], where) -> int:
    for split, values in labels.items():
        bad = [i for i, v in enumerate(values) if v < 0]
        if bad:
            raise BuildError(f"{where}: {split} label {values[bad[0]]} at row {bad[0]} is negative; labels are class "
                             "ids 0..K-1")
    train = set(labels["train"])
    if not train:
        raise BuildError(f"{where}: the train split is empty")
    num_classes = max(train) + 1
    absent = [c for c in range(num_classes) if c not in train]
    if absent:
        raise BuildError(f"{where}: class ids {absent[:20]} never occur in the train labels; regenerate the files")
    for split in ("validation", "test"):
        for i, v in enumerate(labels[split]):
            if v not in train:
                raise BuildError(f"{where}: {split} row {i} has label {v}, which never occurs in the train split "
                                 f"(classes 0..{num_classes - 1}); regenerate the files")
    return num_classes


def _prepared_subset_mask(features_dir: Path, subset: str, source: str, train_labels, train_paths):
    if source == "protocol":
        idx = dvm_low_data_subsets(train_labels)[subset]
        mask = np.zeros(len(train_labels), dtype=bool)
        mask[idx] = True
        return mask, {"subset_source": "recomputed with dvm_low_data_subsets (seed 2023)"}
    ident = features_dir / f"train_labelled_identification_{subset}.pt"
    if ident.is_file():
        flags = [bool(x) for x in load_pt(ident)]
        if len(flags) != len(train_labels):
            raise BuildError(f"{ident} has {len(flags)} flags but the train split has {len(train_labels)} rows; "
                             "regenerate it for this train split")
        return np.asarray(flags), {"subset_source": ident.name}
    ids_file, sub_ids = features_dir / prepared_files("train")["ids"], features_dir / prepared_files("train", f"_{subset}")["ids"]
    if ids_file.is_file() and sub_ids.is_file():
        wanted = {str(x) for x in load_pt(sub_ids)}
        all_ids = [str(x) for x in load_pt(ids_file)]
        if len(all_ids) != len(train_labels):
            raise BuildError(f"{ids_file} has {len(all_ids)} ids but the train split has {len(train_labels)} rows")
        mask = np.asarray([x in wanted for x in all_ids])
        _check_subset_found(mask, len(wanted), sub_ids)
        return mask, {"subset_source": sub_ids.name}
    sub_paths = features_dir / prepared_files("train", f"_{subset}")["paths"]
    if sub_paths.is_file():
        wanted = {str(x) for x in load_pt(sub_paths)}
        mask = np.asarray([p in wanted for p in train_paths])
        _check_subset_found(mask, len(wanted), sub_paths)
        return mask, {"subset_source": sub_paths.name}
    raise BuildError(
        f"no {subset} subset files in {features_dir}: expected {ident.name}, or {sub_ids.name} with {ids_file.name}, "
        f"or {sub_paths.name}; pass --labeled-source protocol to recompute the subset"
    )


def _check_subset_found(mask, wanted, path):
    if int(mask.sum()) != wanted:
        raise BuildError(f"{path} lists {wanted} rows but only {int(mask.sum())} are in the train split; "
                         "the subset belongs to another train split")


# ------------------------------------------------------------------------------ raw download
RAW_TABLES = {
    "ad": ("Ad_table.csv", ["Maker", "Genmodel", "Genmodel_ID", "Adv_ID", "Adv_year", "Adv_month", "Color",
                            "Reg_year", "Bodytype", "Runned_Miles", "Engin_size", "Gearbox", "Fuel_type", "Price",
                            "Seat_num", "Door_num"]),
    "price": ("Price_table.csv", ["Genmodel_ID", "Year", "Entry_price"]),
    "image": ("Image_table.csv", ["Image_ID", "Image_name", "Predicted_viewpoint"]),
    "extra": ("Ad_table (extra).csv", ["Adv_ID", "Genmodel_ID", "Wheelbase", "Length", "Width", "Height"]),
}
# The notebook's two manual wheelbase repairs (Peugeot RCZ, Ford Grand C-Max).
MANUAL_WHEELBASE = {"69_36": 2612.0, "29_20": 2788.0}


def _read_raw(tables: Path, key: str):
    import pandas as pd

    name, required = RAW_TABLES[key]
    path = tables / name
    if not path.is_file():
        raise BuildError(f"missing file {path}; --dvm-root must hold tables_V2.0/ and resized_DVM/ from DVM-CAR")
    df = pd.read_csv(path, low_memory=False)
    df.columns = [str(c).strip() for c in df.columns]  # the download has ' Genmodel_ID' etc.
    absent = [c for c in required if c not in df.columns]
    if absent:
        raise BuildError(f"{path} lacks column(s) {absent}; available: {list(df.columns)}")
    return df


def physical_dimensions(extra, jitter: int = 50, seed: int = 2022):
    """Repair and jitter ``Ad_table (extra)``: manual fixes, fill 0/NaN from the first valid row of the
    same Genmodel_ID (file order), then add ``random.randint(-jitter, jitter)`` per cell with Python's
    ``random.seed(seed)``, column by column (Wheelbase, Length, Width, Height), row by row."""
    import pandas as pd

    extra = extra.copy()
    for attr in ("Wheelbase", "Length", "Width", "Height"):
        extra[attr] = pd.to_numeric(extra[attr], errors="coerce").astype(float)
    gid = extra["Genmodel_ID"].astype(str).str.strip()
    for model, value in MANUAL_WHEELBASE.items():
        extra.loc[gid == model, "Wheelbase"] = value
    for attr in ("Wheelbase", "Length", "Width", "Height"):
        values = extra[attr]
        valid = values.notna() & (values > 0)
        first = values[valid].groupby(gid[valid]).first()
        fill = gid.map(first)
        extra[attr] = values.where(valid, fill)
    rng = random.Random(seed)
    for attr in ("Wheelbase", "Length", "Width", "Height"):
        extra[attr] = [x + rng.randint(-jitter, jitter) for x in extra[attr].tolist()]
    return extra


def build_dvm_raw(
    dvm_root: str | os.PathLike,
    output: str | os.PathLike,
    *,
    min_population: int = 100,
    labeled_subset: str | None = None,
    split_seed: int = 2022,
    jitter: int = 50,
    jitter_seed: int = 2022,
    low_data_seed: int = 2023,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """The raw DVM-CAR download -> stil dataset, following TIP's notebook but storing raw values."""
    import datasets
    import pandas as pd
    from sklearn.model_selection import train_test_split

    check_output_free(output, overwrite)
    _check_subset_name(labeled_subset)
    root = Path(dvm_root)
    tables = root / "tables_V2.0"
    ad, price, image, extra = (_read_raw(tables, k) for k in ("ad", "price", "image", "extra"))
    counts = {"ad_rows": len(ad)}
    image = image.copy()
    image["Adv_ID"] = image["Image_ID"].astype(str).map(lambda s: "$$".join(s.split("$$")[:2]))
    image = image.drop_duplicates(subset=["Adv_ID"])  # one image (the first listed) per advert
    data = ad.merge(price[["Genmodel_ID", "Entry_price", "Year"]], left_on=["Genmodel_ID", "Reg_year"],
                    right_on=["Genmodel_ID", "Year"])
    counts["after_price_join"] = len(data)
    data = data.merge(image[["Adv_ID", "Image_name", "Predicted_viewpoint"]], on="Adv_ID")
    duplicated = data["Adv_ID"][data["Adv_ID"].duplicated()]
    if len(duplicated):
        raise BuildError(f"{tables / RAW_TABLES['ad'][0]}: duplicated Adv_ID {duplicated.iloc[0]!r} after the joins; "
                         "each advert must appear once in Ad_table.csv")
    data = data.dropna()  # TIP drops any row with a missing cell in the joined table
    counts["after_image_join_dropna"] = len(data)
    engine = data["Engin_size"].astype(str).str.strip().str.rstrip("Ll")
    data = data.assign(Engine_size=pd.to_numeric(engine, errors="coerce"),
                       Runned_Miles=pd.to_numeric(data["Runned_Miles"], errors="coerce"),
                       Price=pd.to_numeric(data["Price"], errors="coerce"))
    vocab = {c: sorted({str(v) for v in data[c]}) for c in DVM_CATEGORICAL}  # TIP's codes (pandas categories)
    data = data.dropna(subset=DVM_BASE_CONTINUOUS)
    counts["after_numeric_parse"] = len(data)
    population = data["Genmodel_ID"].value_counts()
    keep = set(population[population >= min_population].index)
    data = data[data["Genmodel_ID"].isin(keep)].reset_index(drop=True)
    if data.empty:
        raise BuildError(f"no car model has at least --min-population {min_population} adverts after cleaning")
    counts["after_class_filter"] = len(data)
    order = list(dict.fromkeys(data["Genmodel_ID"].tolist()))  # first appearance = TIP's label index
    label_of = {g: k for k, g in enumerate(order)}
    firsts = data.drop_duplicates("Genmodel_ID").set_index("Genmodel_ID")
    names = [f"{firsts.loc[g, 'Maker']} {firsts.loc[g, 'Genmodel']} ({g})" for g in order]
    data["label"] = data["Genmodel_ID"].map(label_of)

    paths = []
    for name in data["Image_name"].astype(str):
        parts = name.split("$$")
        paths.append(root / "resized_DVM" / parts[0] / parts[1] / parts[2] / parts[3] / name if len(parts) >= 4
                     else root / "resized_DVM" / name)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise BuildError(f"{len(missing)} image file(s) of the table are absent, e.g. {missing[0]}; the table and "
                         "the images do not match: unpack resized_DVM/ next to tables_V2.0/")
    data["image_path"] = paths

    physical = physical_dimensions(extra, jitter=jitter, seed=jitter_seed)
    physical = physical.drop_duplicates("Adv_ID")[["Adv_ID", *DVM_PHYSICAL]]
    data = data.merge(physical, on="Adv_ID", how="left")  # no row for an advert: physical cells stay null

    ids = data["Adv_ID"].tolist()
    labels_all = data["label"].to_numpy()
    try:
        train_set_ids, test_ids = train_test_split(ids, test_size=0.5, random_state=split_seed, stratify=labels_all)
        # As in the notebook: the stratify vector is in table order, not in train_set_ids order.
        strat = labels_all[data["Adv_ID"].isin(set(train_set_ids)).to_numpy()]
        train_ids, val_ids = train_test_split(train_set_ids, test_size=0.2, random_state=split_seed, stratify=strat)
    except ValueError as error:
        raise BuildError(f"stratified split failed ({error}); raise --min-population so every class has enough "
                         "adverts") from None
    by_id = data.set_index("Adv_ID")
    where = str(tables / RAW_TABLES["ad"][0])
    split_frames = {"train": by_id.loc[train_ids], "validation": by_id.loc[val_ids], "test": by_id.loc[test_ids]}
    columns = {}
    code = {c: {v: k for k, v in enumerate(vocab[c])} for c in DVM_CATEGORICAL}
    for split, frame in split_frames.items():
        cols = {c: [code[c][str(v)] for v in frame[c]] for c in DVM_CATEGORICAL}
        for c in DVM_CONTINUOUS:
            cols[c] = check_continuous(frame[c].tolist(), c, f"{where} ({split} split)", allow_missing=True)
        columns[split] = cols
    schema = TabularSchema.fit(columns["train"], categorical=DVM_CATEGORICAL, continuous=DVM_CONTINUOUS,
                               categories=vocab)
    train_labels = split_frames["train"]["label"].tolist()
    subsets = dvm_low_data_subsets(train_labels, seed=low_data_seed)
    mask = np.ones(len(train_labels), dtype=bool)
    if labeled_subset is not None:
        mask = np.zeros(len(train_labels), dtype=bool)
        mask[subsets[str(labeled_subset)]] = True
    features = make_features(schema, datasets.ClassLabel(names=names))
    splits = {}
    for split, frame in split_frames.items():
        splits[split] = {
            "image": [(p, "file") for p in frame["image_path"]], "label": frame["label"].tolist(), **columns[split],
            "labeled": mask.tolist() if split == "train" else [False] * len(frame),
        }
    metadata = DatasetMetadata(
        task="classification", label_names=names, labeled_indices=np.flatnonzero(mask).tolist(),
        split_info={"protocol": "dvm-tip-low-data" if labeled_subset else "all-labeled", "subset": labeled_subset,
                    "seed": low_data_seed, "subsets": {k: v.tolist() for k, v in subsets.items()},
                    "split_seed": split_seed, "test_fraction": 0.5, "val_fraction_of_rest": 0.2},
        source={"builder": "dvm_raw", "dvm_root": str(root), "min_population": min_population,
                "jitter_mm": jitter, "jitter_seed": jitter_seed, "row_counts": counts,
                "sizes": {s: len(f) for s, f in split_frames.items()},
                "genmodel_ids": order,
                "values": "raw (continuous unnormalised; physical dimensions jittered); vocabularies sorted over the "
                          "cleaned table as in TIP; statistics from train"},
    )
    return write_dataset(splits, features, output, metadata, schema=schema, overwrite=overwrite,
                         image_loader=_load_image, progress=progress)
