"""natgrad.distributed."""
