"""Pure-PyTorch model core: configs, encoder, LM, projectors, weights, images, tokenizer, generation."""
