"""The contract test kit for plugin authors: subclass a contract in a pytest module and pytest
runs every check on your component.

.. code-block:: python

    # tests/test_contract.py of a modality plugin
    from selfflow_core.testing import ModalityContract
    from selfflow_mymodality.adapter import MyModality

    class TestMyModality(ModalityContract):
        config = MyModality.Config(resolution=32)

    # a backbone plugin
    from selfflow_core.testing import BackboneContract

    class TestMyBackbone(BackboneContract):
        config = MyBackbone.Config(depth=4, width=32)
        token_dims = (16, 7)        # two modalities of different widths in one sequence

Class attributes tune the checks (sample count, source, tolerances, ``plugins`` to register an
uninstalled plugin object, ``entry_points=False`` to ignore other installed plugins); fixtures
(``adapter``, ``raw``, ``encoded``, ``fields``, ``batch``; ``backbone``, ``batch``, ``t``) can be
overridden, e.g. ``raw`` for a modality whose raw data must be made up instead of read from a
built-in source. Every check can fail: ``tests/test_contract_toy.py`` in the core feeds it broken
adapters and backbones. The helpers
(:func:`check_token_batch`, :func:`pad_batch`, :func:`randomize_parameters`) are public for tests
of your own. Needs pytest (the ``test`` extra).
"""

import pytest

pytest.register_assert_rewrite("selfflow_core.testing.checks", "selfflow_core.testing.modality",
                               "selfflow_core.testing.backbone")

from selfflow_core.testing.backbone import BackboneContract  # noqa: E402
from selfflow_core.testing.checks import (  # noqa: E402
                               check_config_contract,
                               check_token_batch,
                               pad_batch,
                               randomize_parameters,
)
from selfflow_core.testing.modality import ModalityContract  # noqa: E402

__all__ = [
    "BackboneContract", "ModalityContract", "check_config_contract", "check_token_batch",
    "pad_batch", "randomize_parameters",
]
