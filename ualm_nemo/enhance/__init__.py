"""Enhancement VAE: the codec's 16 kHz mono audio -> 48 kHz stereo (model, losses, data, training, inference)."""
