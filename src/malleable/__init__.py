"""malleable: reshape trained models after training (learn, merge, forget, steer, slim, route)."""

__version__ = "0.1.0"
