"""Training data: the built-in curriculum, the hub registry, dataset files and the BPE tokenizer."""
