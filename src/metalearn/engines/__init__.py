"""Inner-loop engines: ``higher``, ``func`` (torch.func loop) and ``vmap``."""
