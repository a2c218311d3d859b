"""Class labels of a sample set: `uniform`, `balanced` (index mod classes) or a cycled list, drawn per index.

Every random draw of a sample set is seeded by `(seed, stream, index)`, so an image does not depend on the
batch size, the number of ranks or which images were already there.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import DD2Error

#: uniform labels are drawn in chunks of this many indices, each from its own seeded generator
LABEL_BLOCK = 1024


def index_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for `(seed, stream, index)`: independent streams without collisions."""
    digest = hashlib.sha256(f"dd2-sample/{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class LabelSchedule:
    """`uniform` (i.i.d. uniform), `balanced` (`i mod C`: class order, interleaved) or `3,1,4` (cycled).

    A pure function of the index: `schedule(indices)` never depends on `n` or on other indices.
    """

    def __init__(self, text: str, num_classes: int, seed: int) -> None:
        self.text, self.num_classes, self.seed = text.strip().lower(), int(num_classes), int(seed)
        self.values: Optional[list[int]] = None
        if self.text not in ("uniform", "balanced"):
            try:
                self.values = [int(v) for v in self.text.split(",") if v.strip()]
            except ValueError:
                raise DD2Error(f"--labels '{text}' is not uniform, balanced or a comma list of class ids "
                               f"(e.g. 1,7,3).") from None
            if not self.values:
                raise DD2Error("--labels is empty; use uniform, balanced or a comma list of class ids.")
            bad = [v for v in self.values if not 0 <= v < self.num_classes]
            if bad:
                raise DD2Error(f"--labels has class {bad[0]}, outside 0..{self.num_classes - 1}.")

    def __call__(self, indices: Iterable[int]) -> Tensor:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self.text == "balanced":
            return idx % self.num_classes
        if self.values is not None:
            return torch.tensor(self.values, dtype=torch.long)[idx % len(self.values)]
        blocks = idx.div(LABEL_BLOCK, rounding_mode="floor")
        used = blocks.unique()  # sorted
        draws_UL = torch.stack([
            torch.randint(0, self.num_classes, (LABEL_BLOCK,),
                          generator=torch.Generator().manual_seed(index_seed(self.seed, "labels", int(b))))
            for b in used]) if len(used) else torch.empty(0, LABEL_BLOCK, dtype=torch.long)
        return draws_UL[torch.searchsorted(used, blocks), idx % LABEL_BLOCK]


def labels_from_manifest(manifest: Mapping[str, Any]) -> np.ndarray:
    """The labels of a dd2 sample set, recomputed from its manifest."""
    s = manifest["settings"]
    return LabelSchedule(s["labels"], s["num_classes"], s["seed"])(range(int(manifest["n"]))).numpy()
