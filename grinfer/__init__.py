"""grinfer: an inference server for generative recommenders (MTGR / HSTU family)."""

__version__ = "0.1.0"


def load(path, map_location="cpu"):
    """Load a checkpoint directory (config.json + model.safetensors) into a ready, eval-mode model."""
    from grinfer.model.checkpoint import load_checkpoint

    return load_checkpoint(path, map_location=map_location)


__all__ = ["__version__", "load"]
