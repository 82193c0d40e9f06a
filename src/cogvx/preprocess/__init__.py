"""``cogvx preprocess``: videos and captions in, a cache of latent moments and prompt embeddings out."""
