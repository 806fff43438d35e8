"""The core's own plugin: the reference DiT backbone, the toy modality, the jsonl and null
trackers and the toy preset, registered through the same hooks a third-party plugin uses."""
