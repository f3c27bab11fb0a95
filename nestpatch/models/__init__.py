"""Model addressing: tensor names across HF and GGUF, neuron axes, loading into torch."""
