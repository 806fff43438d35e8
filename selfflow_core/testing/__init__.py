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

    # an installed modality plugin as a whole: entry point, round trips, debug_tiny trains
    from selfflow_core.testing import ModalityPluginContract

    class TestMyPlugin(ModalityPluginContract):
        modality = "mymodality"
        distribution = "selfflow-mymodality"

Class attributes tune the checks (sample count, source, tolerances, ``plugins`` to register an
uninstalled plugin object, ``entry_points=False`` to ignore other installed plugins; for a
plugin, ``presets``, ``train_steps``, ``loss_window``/``loss_ratio``, ``train_skip``); fixtures
(``adapter``, ``raw``, ``encoded``, ``fields``, ``batch``; ``backbone``, ``batch``, ``t``;
``debug_tiny_run``) can be overridden or used, e.g. ``raw`` for a modality whose raw data must
be made up instead of read from a built-in source. Every check can fail:
``tests/test_contract_toy.py`` and ``tests/test_contract_plugin.py`` in the core feed it broken
adapters, backbones and plugins. The helpers (:func:`check_token_batch`,
:func:`check_discovered`, :func:`check_round_trip`, :func:`check_loss_lowered`,
:func:`pad_batch`, :func:`randomize_parameters`, :func:`torch_threads`) are public for tests of
your own, and :mod:`selfflow_core.testing.fixtures` is an opt-in pytest plugin of common
fixtures (``one_thread``, ``components``, ``core_components``, ``toy_store``,
``selfflow_cache``). Needs pytest (the ``test`` extra).
"""

import pytest

pytest.register_assert_rewrite("selfflow_core.testing.checks", "selfflow_core.testing.modality",
                               "selfflow_core.testing.backbone", "selfflow_core.testing.plugin",
                               "selfflow_core.testing.fixtures")

from selfflow_core.testing.backbone import BackboneContract  # noqa: E402
from selfflow_core.testing.checks import (  # noqa: E402
                               check_config_contract,
                               check_discovered,
                               check_loss_lowered,
                               check_round_trip,
                               check_token_batch,
                               installed_components,
                               pad_batch,
                               randomize_parameters,
)
from selfflow_core.testing.fixtures import TINY_TOY, torch_threads  # noqa: E402
from selfflow_core.testing.modality import ModalityContract  # noqa: E402
from selfflow_core.testing.plugin import ModalityPluginContract, TinyRun  # noqa: E402

__all__ = [
    "TINY_TOY", "BackboneContract", "ModalityContract", "ModalityPluginContract", "TinyRun",
    "check_config_contract", "check_discovered", "check_loss_lowered", "check_round_trip",
    "check_token_batch", "installed_components", "pad_batch", "randomize_parameters",
    "torch_threads",
]
