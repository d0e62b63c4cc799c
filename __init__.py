"""svdfill: biased matrix factorization (r̂ = μ + b_u + b_i + p_u·q_i) on explicit ratings,
trained from one CPU to many GPUs, and an exact tiled top-k fill of the user-item matrix."""

__version__ = "0.1.0"
