"""eapcore: Edge Attribution Patching with Integrated Gradients on TransformerLens 4.x."""

__version__ = "0.1.0"
