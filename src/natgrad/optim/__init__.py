"""torch.optim.Optimizer subclasses built on natgrad.curvature."""
