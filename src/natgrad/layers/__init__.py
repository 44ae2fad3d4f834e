"""natgrad.layers."""
