"""fedkin: personalized federated learning and estimation (generative view)."""

__version__ = "0.1.0"
