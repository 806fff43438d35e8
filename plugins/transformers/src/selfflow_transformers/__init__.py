"""selfflow-transformers: frozen pretrained text encoders (T5, CLIP, any AutoModel) loaded from
local Hugging Face model directories, never from the Hub."""

from selfflow_transformers.encoder import (
    AutoTextEncoder,
    CLIPTextEncoder,
    ModelDirError,
    PretrainedTextEncoder,
    T5TextEncoder,
    model_dir_version,
)

__all__ = ["AutoTextEncoder", "CLIPTextEncoder", "ModelDirError", "PretrainedTextEncoder",
           "T5TextEncoder", "model_dir_version"]
