"""Helpers shared by test directories, one home each: the formats.md §12.0 test vectors
(`spec_vectors`), random canonical weights for any spec (`quant_weights`) and the images and
tiny vision-language checkpoints of the multimodal tests (`images`)."""
