"""The ``selfflow`` command (:mod:`.main`) and the modality scaffold (:mod:`.scaffold`)."""
