"""selfflow-timeseries: a modality plugin for selfflow (multichannel 1-D signals).

Installing the distribution registers the modality kind ``timeseries`` and the presets
``timeseries`` and ``timeseries_debug_tiny`` through the ``selfflow`` entry-point group. The
sources and the SVG plot helper live in :mod:`selfflow_timeseries.adapter`.
"""

from selfflow_timeseries.adapter import TimeseriesModality

__all__ = ["TimeseriesModality"]
__version__ = "0.1.0"
