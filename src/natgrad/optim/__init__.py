"""natgrad.optim."""
