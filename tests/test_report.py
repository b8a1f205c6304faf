"""The report's description of each base learner names the towers it was built from."""

from jmmshap import report


def test_an_mmbt_is_described_by_the_tower_it_has():
  bert = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 2}
  resnet = {"model_type": "resnet", "depth": 18, "hidden_sizes": [32, 64, 128, 256]}
  clip = {"model_type": "clip_vision_model", "hidden_size": 128, "num_hidden_layers": 4}
  config = {"stage": "mmbt", "data": {"image_size": 64}, "init_from_text": "minilm",
            "init_from_image": "W/image/export",
            "model": {"num_image_embeddings": 2, "image_tower": "resnet", "bert": bert,
                      "resnet": resnet, "clip": clip}}
  assert report.describe_learner(config) == (
      "ResNet-MMBT, 2 image embeddings, 64 px; text: bert 384 wide, 2 layers, from minilm; "
      "vision: ResNet-18, from W/image/export")
  del config["model"]["image_tower"], config["init_from_image"]  # Saved before the ResNet tower.
  assert report.describe_learner(config).startswith("CLIP-MMBT, 2 image embeddings")
  assert report.describe_learner(config).endswith(
      "vision: clip_vision_model 128 wide, 4 layers, trained from scratch")
