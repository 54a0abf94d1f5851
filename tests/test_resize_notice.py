"""Images resized on decoding are announced once per process, not once per image."""

from __future__ import annotations

import io


def test_resize_is_said_once(tmp_path):
    import warnings

    import numpy as np
    from PIL import Image

    from data_utils import loaders

    monkey = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(monkey, format="PNG")
    loaders._RESIZE_NOTICE_GIVEN = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loaders.decode_image({"bytes": monkey.getvalue(), "path": None}, 3, 16)
    notices = [w for w in caught if "resized" in str(w.message)]
    assert len(notices) == 1 and "20x20" in str(notices[0].message) and "16x16" in str(notices[0].message)
