"""REPA's projector: the head between the student's block-``l`` state and the encoder's features.

REPA (``build_mlp`` in sihyun-yu/REPA) projects with a three-layer MLP,
``Linear(d, 2048) - SiLU - Linear(2048, 2048) - SiLU - Linear(2048, d_enc)`` (about 8.1M
parameters for SiT-XL, d = 1152 and DINOv2-B's d_enc = 768), where Self-Flow's head is
``Linear(d, 2d) - SiLU - Linear(2d, d)``. :meth:`REPATeacher.projection_head` hands this module
to the core, which trains it in place of its own head.
"""

from __future__ import annotations

from torch import nn

#: REPA's projector width
REPA_HIDDEN = 2048
#: Linear layers of REPA's projector
REPA_LAYERS = 3


class REPAProjector(nn.Sequential):
    """``layers`` Linear layers with SiLU between them: ``width -> hidden -> ... -> hidden ->
    target_width`` (default: REPA's Linear(d, 2048) - SiLU - Linear(2048, 2048) - SiLU -
    Linear(2048, d_enc)). One layer is a plain ``Linear(width, target_width)``."""

    def __init__(self, width: int, target_width: int, *, hidden: int = REPA_HIDDEN,
                 layers: int = REPA_LAYERS) -> None:
        if layers < 1 or hidden < 1:
            raise ValueError(f"a projector needs layers >= 1 and hidden >= 1 (got layers "
                             f"{layers}, hidden {hidden})")
        dims = [width, *[hidden] * (layers - 1), target_width]
        modules: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            if i:
                modules.append(nn.SiLU())
            modules.append(nn.Linear(a, b))
        super().__init__(*modules)
