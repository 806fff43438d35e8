"""selfflow-repa: the REPA baseline (Yu et al., arXiv 2410.06940) as a teacher strategy."""

from selfflow_repa.label_free import train_masked_autoencoder
from selfflow_repa.projector import REPAProjector
from selfflow_repa.teacher import EncoderError, REPATeacher, file_sha256, save_encoder

__all__ = ["EncoderError", "REPAProjector", "REPATeacher", "file_sha256", "save_encoder",
           "train_masked_autoencoder"]
