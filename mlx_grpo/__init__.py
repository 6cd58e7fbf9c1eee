"""mlx-grpo: GRPO training for language models on MLX."""

from mlx_grpo.blas import load_optimized_blas

# Must run before anything imports mlx.core (Linux CPU only; a no-op on macOS).
load_optimized_blas()

__version__ = "0.1.0"
