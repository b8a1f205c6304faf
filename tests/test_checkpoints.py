"""A checkpoint of another config is refused before restoring, naming each differing parameter."""

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from jmmshap import checkpoints


def _save(directory, tree):
  manager = ocp.CheckpointManager(directory, item_handlers={"model": ocp.StandardCheckpointHandler()})
  manager.save(3, args=ocp.args.Composite(model=ocp.args.StandardSave(tree)))
  manager.wait_until_finished()
  return manager


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


SAVED = {"params": {"encoder": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)},
                    "head": {"kernel": jnp.zeros((8, 3))}}}


def test_same_shapes_pass(tmp_path):
  manager = _save(str(tmp_path / "ckpt"), SAVED)
  checkpoints.check_matches(manager, 3, "model", _abstract(SAVED), "ckpt")


def test_other_config_names_missing_unexpected_and_reshaped_parameters(tmp_path):
  manager = _save(str(tmp_path / "ckpt"), SAVED)
  other = {"params": {"encoder": {"kernel": jnp.zeros((4, 16)), "bias": jnp.zeros(16)},
                      "head": {"kernel": jnp.zeros((16, 3))}, "pooler": {"kernel": jnp.zeros(2)}}}
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    checkpoints.check_matches(manager, 3, "model", _abstract(other), "W/text/best")
  message = str(error.value)
  assert "W/text/best (step 3) was written by a model of another config" in message
  assert "missing from the checkpoint (1): params/pooler/kernel" in message
  assert "params/encoder/kernel: (4, 8) in the checkpoint, (4, 16) in the model" in message
  assert "params/head/kernel: (8, 3) in the checkpoint, (16, 3) in the model" in message


def test_unexpected_parameters_are_named(tmp_path):
  manager = _save(str(tmp_path / "ckpt"), SAVED)
  smaller = {"params": {"encoder": SAVED["params"]["encoder"]}}
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"not in the model \(1\): "
                     r"params/head/kernel"):
    checkpoints.check_matches(manager, 3, "model", _abstract(smaller), "ckpt")
