"""A small user table (CSV or Parquet) with images beside it, as `scripts/prepare_dataset.py` reads one,
and the column flags that describe it."""

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

COLORS = ["red", "blue", "green"]


def make_table(folder: Path, n: int = 24, suffix: str = ".csv", mutate=None) -> Path:
    """n rows, 3 classes, images img/{i}.png (16 px), one missing colour and one missing length."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        rows.append({
            "path": f"img/{i}.png", "model": ["a", "b", "c"][i % 3], "color": COLORS[i % 3],
            "doors": [2, 4][i % 2], "length": 4000.0 + 10 * i, "price": 1000.0 * (i + 1),
        })
    rows[5]["color"] = None
    rows[7]["length"] = float("nan")
    df = pd.DataFrame(rows)
    if mutate is not None:
        df = mutate(df)
    path = folder / f"table{suffix}"
    if suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


# prepare_dataset.py's column flags for make_table's columns
BASE = ["--image-column", "path", "--label-column", "model", "--categorical", "color,doors",
        "--continuous", "length,price", "--no-progress"]
