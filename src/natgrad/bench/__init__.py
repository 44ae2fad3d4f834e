"""natgrad.bench."""
