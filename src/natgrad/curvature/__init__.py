"""The Fisher in every representation: dense, matrix-free products, Kronecker factors."""
