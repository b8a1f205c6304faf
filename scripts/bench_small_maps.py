r"""Convolutions on small maps: XLA's convolution against `resnet.conv_as_matmul`, and the image
learner's train step with and without the matmul route (`ResNetConfig.matmul_conv_positions`).

  PYTHONPATH=. python scripts/bench_small_maps.py --out=docs/benchmarks/small_maps_cpu.json

(from the repository root). Why: on a CPU the fashion image learner (ResNet-18, width 32, 64 px)
spent most of its step in its last stage, whose maps are 2x2; this records what each route costs.
Layer cases time one 3x3 convolution at batch 128, forward and its gradient (input and kernel), both
routes. Step cases time `classifier.make_train_step` with AdamW (bench_models.compile_train) on
random pixels, at the variant's image size and batch. Times are medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Sibling scripts (scripts/ is on sys.path when this file runs).
import bench_models
import timing

from configs import image as image_config
from jmmshap import classifier, parallel
from jmmshap.models import resnet

# (map size, channels, stride) of the fashion ResNet-18's 3x3 convolutions at 64 px, the last
# stage's first (stride 2 into 2x2) and the 4x4 ones for contrast.
LAYER_CASES = ((16, 32, 1), (8, 64, 1), (4, 128, 1), (4, 256, 2), (2, 256, 1))
DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def layer_case(size: int, channels: int, stride: int, batch_size: int, repeats: int
               ) -> dict[str, Any]:
  x = jax.random.normal(jax.random.key(0), (batch_size, size, size, channels))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.01
  routes = {
      "convolution": lambda x, k: jax.lax.conv_general_dilated(
          x, k, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=DIMENSIONS),
      "matmul": lambda x, k: resnet.conv_as_matmul(x, k, stride, 1),
  }
  np.testing.assert_allclose(routes["matmul"](x, kernel), routes["convolution"](x, kernel),
                             rtol=1e-4, atol=1e-4)
  row: dict[str, Any] = {"map": size, "channels": channels, "stride": stride}
  for name, route in routes.items():
    forward = jax.jit(route)
    gradient = jax.jit(jax.grad(lambda x, k, f=route: f(x, k).sum(), argnums=(0, 1)))
    row[f"{name}_forward_ms"] = 1e3 * timing.median_seconds(lambda: forward(x, kernel), repeats)
    row[f"{name}_gradient_ms"] = 1e3 * timing.median_seconds(lambda: gradient(x, kernel), repeats)
  return row


def step_case(variant: str, matmul_conv_positions: int, repeats: int, steps: int,
              mesh: jax.sharding.Mesh) -> dict[str, Any]:
  config = image_config.get_config(variant)
  architecture = dataclasses.replace(classifier.resnet_config(config.model),
                                     matmul_conv_positions=matmul_conv_positions)
  workload = bench_models.Workload(
      lambda dtype, rngs: resnet.ResNet(architecture, num_labels=31, dtype=dtype, rngs=rngs),
      ("pixel_values",),
      lambda key, batch_size: {"pixel_values": jax.random.normal(
          key, (batch_size, config.data.image_size, config.data.image_size, 3))},
      {})
  model = workload.build(jnp.float32, nnx.Rngs(0))
  batch = bench_models.random_batch(workload, config.batch_size, 31, 0, mesh)
  _, _, run_steps = bench_models.compile_train(model, workload.inputs, batch, mesh, None)
  times = bench_models.seconds_per_step(run_steps, 1, repeats, steps)
  seconds = float(np.median(times))
  return {"variant": variant, "image_size": config.data.image_size,
          "batch_size": config.batch_size, "depth": architecture.depth,
          "hidden_sizes": list(architecture.hidden_sizes),
          "matmul_conv_positions": matmul_conv_positions, "seconds_per_step": seconds,
          "images_per_second": config.batch_size / seconds}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="fashion", help="configs/image.py variant of the step")
  parser.add_argument("--batch_size", type=int, default=128, help="batch of the layer cases")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3, help="train steps per timed repeat")
  parser.add_argument("--out", default=None, help="JSON file to write")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  mesh = parallel.make_mesh()
  result = {
      "environment": bench_models.environment(),
      "cpu_count": os.cpu_count(),
      "layers": [layer_case(*case, args.batch_size, args.repeats) for case in LAYER_CASES],
      "train_steps": [step_case(args.variant, positions, args.repeats, args.steps, mesh)
                      for positions in (0, resnet.ResNetConfig.matmul_conv_positions)],
  }
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
