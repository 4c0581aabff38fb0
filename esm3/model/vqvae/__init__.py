"""The structure tokenizer: ESM3's VQ-VAE (paper A.1.7)."""
