"""The latent store on zarr (writer, reader, checks) and the resumable ``torchdata.nodes``
loader."""
