"""Weight initialisers that stay fast to compile on a CPU.

XLA:CPU compiles a 4-D partitionable-threefry draw extremely slowly: one (3, 3, 8, 9) normal draw took
38 s to compile on this project's 2-core machine, against about 1 s for a 1-D draw of the same size, and
a ResNet has a dozen kernel shapes. Convolution kernels are therefore drawn as a flat vector and
reshaped: the same distribution, one cheap compile per size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def conv_kernel(scale: float, mode: str) -> jax.nn.initializers.Initializer:
  """He/LeCun-style normal init of an (H, W, C_in, C_out) kernel: std = sqrt(scale / fan)."""
  if mode not in ("fan_in", "fan_out"):
    raise ValueError(f"mode={mode!r}: use 'fan_in' or 'fan_out'")

  def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    receptive_field = math.prod(shape[:-2])
    fan = receptive_field * (shape[-2] if mode == "fan_in" else shape[-1])
    flat = jax.random.normal(key, (math.prod(shape),), dtype)
    return (math.sqrt(scale / fan) * flat).reshape(shape).astype(dtype)

  return init
