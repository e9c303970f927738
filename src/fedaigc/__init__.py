"""fedaigc: federated, personalized text-to-image generation on edge devices."""

__version__ = "0.1.0"
