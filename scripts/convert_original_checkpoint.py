#!/usr/bin/env python
"""Convert an original STiL or TIP Lightning checkpoint into a stil model folder.

    python scripts/convert_original_checkpoint.py --kind stil --checkpoint best.ckpt \
        --field-lengths tabular_lengths_all_views_physical_reordered.pt --output converted/stil-dvm
    python scripts/convert_original_checkpoint.py --kind tip --checkpoint checkpoint_last_epoch_499.ckpt \
        --field-lengths dvm --output converted/tip-dvm

See modeling_stil/convert_original.py (how the file is read safely, the key mapping) and
docs/models.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_stil.convert_original import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
