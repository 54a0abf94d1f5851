"""A synthetic dataset folder gets the mode a mkdir would (shared with the group under umask 002)."""

from __future__ import annotations

import stat


def test_synthetic_dataset_folder_is_shared_like_a_mkdir(tmp_path):
    import os

    from data_utils.permissions import current_umask
    from data_utils.synthetic import make_synthetic_dataset

    old = os.umask(0o002)
    try:
        path = make_synthetic_dataset("image", tmp_path / "ds", num_samples=200, image_size=16)
        assert stat.S_IMODE(path.stat().st_mode) == 0o775 == 0o777 & ~current_umask()
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o775 for p in path.rglob("*") if p.is_dir())
    finally:
        os.umask(old)
