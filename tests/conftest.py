"""Two fake CPU devices for every test, so sharded code paths run as on a multi-device host."""

import os

# Tiny test programs: XLA's expensive CPU optimisation passes cost more compile time than they save.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                      "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

import pytest  # pylint: disable=wrong-import-position  (after the environment above)
import train_subprocess  # pylint: disable=wrong-import-position


@pytest.fixture(autouse=True, scope="module")
def no_training_process_outlives_its_module():
  """Kills any train.py a module's tests started and left running (a failed fixture, say)."""
  yield
  train_subprocess.kill_all()
