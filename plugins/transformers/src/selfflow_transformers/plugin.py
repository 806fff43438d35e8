"""Registers the text encoders ``t5``, ``clip`` and ``auto`` with selfflow (entry point
``transformers`` in group ``selfflow``).

Importing this module does not import transformers (a few seconds); an encoder does when built.
"""

from selfflow_core import hookimpl
from selfflow_transformers.encoder import AutoTextEncoder, CLIPTextEncoder, T5TextEncoder


@hookimpl
def selfflow_register_text_encoders(registry):
    for encoder in (T5TextEncoder, CLIPTextEncoder, AutoTextEncoder):
        registry.add(encoder.Config)
