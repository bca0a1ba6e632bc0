"""Model resolution: local directories and built-in offline models (`builtin:tiny`, `builtin:smollm2-135m`)."""

from crv_ray.models.builtin import BUILTIN_MODELS, is_builtin, resolve_model

__all__ = ["BUILTIN_MODELS", "is_builtin", "resolve_model"]
