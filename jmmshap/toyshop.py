"""Toyshop: a generated product dataset whose per-class modality reliance is known by construction.

Real catalogues never say how much each class depends on the photo versus the title, so MM-SHAP
estimates on them cannot be checked. Toyshop can: every class belongs to one of three groups, and the
group fixes which modality carries the class identity.

- **Title-decided** classes (`reliance='text'`, `text_share=1.0`): the title names the product kind
  ("lamp", "desk lamp", "reading light", ...) with varied wording: brand, adjectives, word order and
  suffixes drawn from pools shared by every class. The image is drawn from one distribution shared by all
  title-decided classes: a desaturated (grey/beige) object of a random shape. Only the title separates
  these classes.
- **Image-decided** classes (`reliance='image'`, `text_share=0.0`): each class is one (shape, colour)
  design, e.g. `design/red-circle`, drawn as a saturated solid object. The title comes from a generic
  vocabulary ("gift", "keepsake", "trinket", ...) shared by all image-decided classes, so it says nothing
  about which design it is. Only the image separates these classes.
- **Both** classes (`reliance='both'`, `text_share=0.5`): classes are kinds x variants, e.g.
  `mug/orange`, `mug/teal`, `cap/orange`, `cap/teal`. The title names the kind (shared by all
  variants of that kind); the image shows a random shape in the variant's colour (shared by all kinds;
  the variant colours are disjoint from the designs' colours). Each modality halves the candidates symmetrically (with the defaults,
  2 kinds x 2 variants): neither alone decides, both together do, and neither is more informative.

Every image has the same background distribution (a desaturated gradient plus pixel noise) and every
object a random position, size and rotation, so a model must learn shape and colour rather than pixel positions.

The designed shares are the ideal for the *within-group* decision. Which group an example belongs to is
visible in both modalities (kind words vs generic nouns in the title; grey objects vs design colours
vs variant colours in the image): the brief requires group-shared vocabularies and image distributions,
and no design can hide the group from both modalities while keeping each group decidable. Measured
MM-SHAP shares are therefore expected to be pulled somewhat towards 0.5 for the text and image groups;
what must be recovered is the ordering text > both > image and the symmetry of the 'both' group.

**Shortcut words** (`shortcut_strength`, off by default) make a multimodal model collapse onto the
title where the data needs the photo. Every image-decided title then ends with a product-line word
("lumo line"), one per image-decided class. In train, the line word is the class's own with
probability `shortcut_strength` and otherwise drawn uniformly from all line words; in validation and
test it is always drawn uniformly, so it says nothing there. At strength 1 a title decides every
image-decided training example: a model trained jointly fits train from the one word, faster than
from the photo, and leaves its image pathway unlearnt; on test the word points at a random class.
The line word is drawn after the title and the image, so an example's title and photo are the same
at every strength (with it off, byte-identical to the datasets made before the option existed).

Examples are generated from a seed derived from (spec.seed, split, class, index), so each example is
independent of the sizes of every split and class, and the same spec gives byte-identical examples.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
from collections.abc import Iterator
from typing import Literal

import numpy as np
from PIL import Image

# Part of the prepared-data cache key: bump whenever generation changes what an example looks like.
GENERATOR_VERSION = 3

SPLITS = ("train", "validation", "test")
_SPLIT_CODES = {split: code for code, split in enumerate(SPLITS)}

Reliance = Literal["text", "image", "both"]

_SHAPES = ("circle", "square", "triangle", "cross", "ring", "crescent")
_COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
}
# Variant colours of the 'both' group, disjoint from the designs' colours so they never collide.
_VARIANT_COLOURS = {
    "orange": (0.95, 0.55, 0.10),
    "teal": (0.10, 0.65, 0.65),
    "pink": (0.95, 0.45, 0.75),
    "lime": (0.60, 0.95, 0.20),
}
_VARIANTS = tuple(_VARIANT_COLOURS)

# Kinds named by title-decided classes, each with synonyms so the text model learns the kind, not a string.
_TEXT_KINDS = {
    "lamp": ("lamp", "desk lamp", "reading light"),
    "kettle": ("kettle", "electric kettle", "hot jug"),
    "backpack": ("backpack", "rucksack", "daypack"),
    "sneakers": ("sneakers", "trainers", "running shoes"),
    "watch": ("watch", "wristwatch", "chronograph"),
    "umbrella": ("umbrella", "rain umbrella", "parasol"),
    "wallet": ("wallet", "billfold", "card holder"),
    "candle": ("candle", "scented candle", "tealight"),
    "blender": ("blender", "smoothie maker", "food mixer"),
    "scarf": ("scarf", "muffler", "neck wrap"),
    "helmet": ("helmet", "bike helmet", "crash helmet"),
    "pillow": ("pillow", "bed pillow", "sleeping pillow"),
    "toaster": ("toaster", "bread toaster", "sandwich grill"),
    "headphones": ("headphones", "headset", "earphones"),
    "sunglasses": ("sunglasses", "shades", "sun specs"),
    "notebook": ("notebook", "journal", "notepad"),
    "skateboard": ("skateboard", "longboard", "skate deck"),
    "teapot": ("teapot", "tea pot", "infuser pot"),
    "blanket": ("blanket", "throw", "quilt"),
    "gloves": ("gloves", "mittens", "winter gloves"),
    "yoga mat": ("yoga mat", "exercise mat", "fitness mat"),
    "water bottle": ("water bottle", "flask", "sports bottle"),
    "alarm clock": ("alarm clock", "bedside clock", "wake-up clock"),
    "hair dryer": ("hair dryer", "blow dryer", "hairdryer"),
}
# Kinds of the 'both' group: disjoint from the title-decided kinds so the two groups never share a word.
_BOTH_KINDS = {
    "mug": ("mug", "coffee mug", "cup"),
    "cap": ("cap", "baseball cap", "snapback"),
    "tote": ("tote bag", "shopper", "tote"),
    "t-shirt": ("t-shirt", "tee", "short-sleeve top"),
    "socks": ("socks", "ankle socks", "sport socks"),
    "phone case": ("phone case", "phone cover", "smartphone shell"),
    "cushion": ("cushion cover", "cushion case", "sofa cushion"),
    "apron": ("apron", "kitchen apron", "chef apron"),
}
# Product-line words of the shortcut (`ToyshopSpec.shortcut_strength`), one per image-decided class:
# invented words, in none of the other title vocabularies.
_LINE_WORDS = ("lumo", "vexari", "dorenk", "kalith", "pimzu", "zetora", "bruvik", "quellan", "fosk",
               "marnet", "tivola", "gresh", "yombi", "caddox", "nurel", "ostrim", "wevna", "haplix",
               "jorun", "sefti", "ulbek", "ravim", "enzo", "iktar", "bolvy", "drasmo", "feyrin",
               "ghollu", "kwest", "plimo")
# The one title vocabulary of all image-decided classes.
_GENERIC_NOUNS = ("gift", "item", "accessory", "novelty", "keepsake", "collectible", "souvenir",
                  "decor piece", "mystery box", "trinket")
# Shared by every class, so they carry no class information.
_BRANDS = ("Acme", "Nordby", "Kavo", "Lumio", "Tessaro", "Orbit", "Pellar", "Zunik", "Holm",
           "Brightway", "Mirel", "Quanta")
_ADJECTIVES = ("classic", "premium", "compact", "modern", "vintage", "lightweight", "handmade",
               "deluxe", "everyday", "eco", "durable", "slim", "portable", "elegant", "sturdy", "soft")
_SUFFIXES = ("new arrival", "bestseller", "limited edition", "pack of 2", "free shipping")
_TEMPLATES = (
    "{brand} {adj} {noun}",
    "{adj} {noun} by {brand}",
    "{brand} {noun}, {adj}",
    "{noun} - {brand} {adj} edition",
    "{adj} {adj2} {noun}",
    "{brand} {noun}",
)

MIN_CLASSES, MAX_CLASSES = 10, 31
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 64


@dataclasses.dataclass(frozen=True)
class ClassInfo:
  """One class and the modality reliance it was built with (the ground truth for MM-SHAP)."""
  name: str
  reliance: Reliance
  text_share: float


@dataclasses.dataclass(frozen=True)
class ToyshopSpec:
  """Sizes and seed of a toyshop dataset; validated on construction so a bad spec fails early."""
  num_text_classes: int = 4
  num_image_classes: int = 4
  num_kinds: int = 2
  num_variants: int = 2
  train_per_class: int = 100
  validation_per_class: int = 30
  test_per_class: int = 50
  image_size: int = 32
  seed: int = 0
  # None: no line words. In [0, 1]: how often a training title's line word is its class's own
  # (module docstring).
  shortcut_strength: float | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == "shortcut_strength":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0.0 <= value <= 1.0):
          raise ValueError(f"ToyshopSpec.shortcut_strength must be None (off) or in [0, 1], got "
                           f"{value!r}.")
      elif not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"ToyshopSpec.{field.name} must be an int, got {value!r}.")
    limits = {
        "num_text_classes": (2, len(_TEXT_KINDS)),
        "num_image_classes": (2, len(_SHAPES) * len(_COLOURS)),
        "num_kinds": (2, len(_BOTH_KINDS)),
        "num_variants": (2, len(_VARIANTS)),
        "image_size": (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
    }
    for name, (low, high) in limits.items():
      value = getattr(self, name)
      if not low <= value <= high:
        raise ValueError(f"ToyshopSpec.{name}={value} is outside {low}..{high}.")
    for name in ("train_per_class", "validation_per_class", "test_per_class"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ToyshopSpec.{name}={getattr(self, name)} must be positive.")
    if self.seed < 0:
      raise ValueError(f"ToyshopSpec.seed={self.seed} must be non-negative.")
    if not MIN_CLASSES <= self.num_classes <= MAX_CLASSES:
      raise ValueError(
          f"ToyshopSpec has {self.num_classes} classes (num_text_classes={self.num_text_classes} + "
          f"num_image_classes={self.num_image_classes} + num_kinds x num_variants="
          f"{self.num_kinds}x{self.num_variants}); it must have {MIN_CLASSES} to {MAX_CLASSES}. "
          "Change the group sizes.")

  @property
  def num_classes(self) -> int:
    return self.num_text_classes + self.num_image_classes + self.num_kinds * self.num_variants

  def per_class(self, split: str) -> int:
    _check_split(split)
    return getattr(self, f"{split}_per_class")


def _check_split(split: str) -> None:
  if split not in _SPLIT_CODES:
    raise ValueError(f"Unknown toyshop split {split!r}; expected one of {', '.join(SPLITS)}.")


def _image_designs(count: int) -> list[tuple[str, str]]:
  """(shape, colour) of each image-decided class, all distinct.

  Shapes cycle every 6 classes and colours every 5, and each new shape cycle shifts the colours by one
  more, so classes sharing a shape never share a colour (for up to 6 x 5 classes).
  """
  colours = list(_COLOURS)
  return [(_SHAPES[i % len(_SHAPES)], colours[(i + i // len(_SHAPES)) % len(colours)])
          for i in range(count)]


@dataclasses.dataclass(frozen=True)
class _ClassRecipe:
  info: ClassInfo
  nouns: tuple[str, ...]        # Title nouns to draw from.
  line: int | None = None       # Image-decided: the index of its line word (the shortcut).
  shape: str | None = None      # Image-decided: the class's shape ...
  colour: str | None = None     # ... and colour.
  variant: str | None = None    # Both: the variant's colour.


def _recipes(spec: ToyshopSpec) -> list[_ClassRecipe]:
  recipes = []
  for kind in list(_TEXT_KINDS)[:spec.num_text_classes]:
    recipes.append(_ClassRecipe(ClassInfo(kind, "text", 1.0), _TEXT_KINDS[kind]))
  for line, (shape, colour) in enumerate(_image_designs(spec.num_image_classes)):
    recipes.append(_ClassRecipe(ClassInfo(f"design/{colour}-{shape}", "image", 0.0), _GENERIC_NOUNS,
                                line=line, shape=shape, colour=colour))
  for kind in list(_BOTH_KINDS)[:spec.num_kinds]:
    for variant in _VARIANTS[:spec.num_variants]:
      recipes.append(_ClassRecipe(ClassInfo(f"{kind}/{variant}", "both", 0.5), _BOTH_KINDS[kind],
                                  variant=variant))
  return recipes


def classes(spec: ToyshopSpec) -> list[ClassInfo]:
  """Classes in label order: title-decided, then image-decided, then kinds x variants."""
  return [recipe.info for recipe in _recipes(spec)]


class _Draws:
  """Uniform numbers drawn in one rng call per example: per-call overhead dominated generation time.

  An example uses at most 27 (title 7, image at most 18, line word 2); the budget leaves room for a
  few more.
  """

  def __init__(self, rng: np.random.Generator, count: int = 32):
    self._values = iter(rng.random(count).tolist())

  def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * next(self._values)

  def index(self, n: int) -> int:
    return min(int(next(self._values) * n), n - 1)


def _title(draws: _Draws, nouns: tuple[str, ...]) -> str:
  template = _TEMPLATES[draws.index(len(_TEMPLATES))]
  adj = draws.index(len(_ADJECTIVES))
  adj2 = (adj + 1 + draws.index(len(_ADJECTIVES) - 1)) % len(_ADJECTIVES)  # Never the same twice.
  title = template.format(brand=_BRANDS[draws.index(len(_BRANDS))], adj=_ADJECTIVES[adj],
                          adj2=_ADJECTIVES[adj2], noun=nouns[draws.index(len(nouns))])
  add_suffix = draws.uniform() < 0.3
  suffix = _SUFFIXES[draws.index(len(_SUFFIXES))]  # Drawn either way: a fixed draw budget per title.
  if add_suffix:
    title += f" ({suffix})"
  return title[0].upper() + title[1:]


def line_words(spec: ToyshopSpec) -> tuple[str, ...]:
  """The shortcut's line words, in the order of the image-decided classes."""
  return _LINE_WORDS[:spec.num_image_classes]


def title_line_word(title: str) -> str | None:
  """The line word a title ends with (" <word> line"), or None: what a collapsed model reads."""
  words = title.split()
  return words[-2] if len(words) >= 2 and words[-1] == "line" and words[-2] in _LINE_WORDS else None


def _line_word(draws: _Draws, recipe: _ClassRecipe, spec: ToyshopSpec, split: str) -> str:
  """The title's line word: the class's own with probability `shortcut_strength` in train, else
  uniform over the line words (always uniform in validation and test)."""
  words = line_words(spec)
  own = draws.uniform() < spec.shortcut_strength and split == "train"
  drawn = words[draws.index(len(words))]  # Drawn either way: a fixed draw budget per title.
  return words[recipe.line] if own else drawn


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Shape in object coordinates (radius 1); no shape is a rotation of another, as objects rotate."""
  if shape == "circle":
    return u * u + v * v <= 1.0
  if shape == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8
  if shape == "triangle":
    return (v >= -0.5) & (np.sqrt(3.0) * np.abs(u) + v <= 1.0)
  if shape == "cross":
    abs_u, abs_v = np.abs(u), np.abs(v)
    return (np.minimum(abs_u, abs_v) <= 0.3) & (np.maximum(abs_u, abs_v) <= 0.95)
  if shape == "ring":
    radius_squared = u * u + v * v
    return (radius_squared >= 0.55**2) & (radius_squared <= 1.0)
  if shape == "crescent":
    return (u * u + v * v <= 1.0) & ((u - 0.45)**2 + v * v >= 0.75**2)
  raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=None)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [-1, 1], (y, x), computed once per image size."""
  axis = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
  y, x = np.meshgrid(axis, axis, indexing="ij")
  y.flags.writeable = x.flags.writeable = False
  return y, x


def _image(draws: _Draws, noise: np.ndarray, recipe: _ClassRecipe, size: int) -> np.ndarray:
  """One HxWx3 uint8 image; float32 throughout because generation speed is the budget here."""
  y, x = _pixel_grid(size)

  # Background: the same desaturated gradient distribution for every class.
  grey_a, grey_b = draws.uniform(0.3, 0.8), draws.uniform(0.3, 0.8)
  colour_a = np.array([grey_a + draws.uniform(-0.08, 0.08) for _ in range(3)], np.float32)
  colour_b = np.array([grey_b + draws.uniform(-0.08, 0.08) for _ in range(3)], np.float32)
  angle = draws.uniform(0.0, 2.0 * np.pi)
  ramp = np.float32(np.cos(angle) / 2) * x + np.float32(np.sin(angle) / 2) * y + np.float32(0.5)
  image = colour_a + (colour_b - colour_a) * ramp[..., None]

  # Object: random position, size and rotation, in object coordinates u, v (radius 1).
  centre_x, centre_y = draws.uniform(-0.35, 0.35), draws.uniform(-0.35, 0.35)
  radius = draws.uniform(0.3, 0.5)
  rotation = draws.uniform(0.0, 2.0 * np.pi)
  dx, dy = x - np.float32(centre_x), y - np.float32(centre_y)
  cos, sin = np.float32(np.cos(rotation) / radius), np.float32(np.sin(rotation) / radius)
  u = cos * dx + sin * dy
  v = cos * dy - sin * dx
  random_shape = _SHAPES[draws.index(len(_SHAPES))]
  jitter = np.array([draws.uniform(-0.06, 0.06) for _ in range(3)], np.float32)

  if recipe.colour is not None:  # Image-decided: the class's design, solid.
    image[_shape_mask(recipe.shape, u, v)] = np.array(_COLOURS[recipe.colour]) + jitter
  elif recipe.variant is not None:  # Both: a random shape in the variant's colour.
    image[_shape_mask(random_shape, u, v)] = np.array(_VARIANT_COLOURS[recipe.variant]) + jitter
  else:  # Title-decided: one shared distribution, a grey-ish object contrasting with the background.
    grey = ((grey_a + grey_b) / 2.0 + draws.uniform(0.3, 0.7)) % 1.0
    image[_shape_mask(random_shape, u, v)] = grey + jitter

  image += noise  # Uniform pixel noise: breaks flat colours, cheaper to draw than Gaussian.
  image *= np.float32(255.0)
  return np.clip(image, 0.0, 255.0).round().astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  # Uncompressed: deflate was a third of generation time and saves only ~25% on noisy images.
  Image.fromarray(image).save(buffer, format="PNG", compress_level=0)
  return buffer.getvalue()


def examples(spec: ToyshopSpec, split: str) -> Iterator[dict]:
  """The split's examples, classes interleaved: {'id', 'title', 'image' (PNG bytes), 'label' (name)}."""
  _check_split(split)
  recipes = _recipes(spec)
  noise_shape = (spec.image_size, spec.image_size, 3)
  for index in range(spec.per_class(split)):
    for class_index, recipe in enumerate(recipes):
      rng = np.random.default_rng([spec.seed, _SPLIT_CODES[split], class_index, index])
      draws = _Draws(rng)
      noise = rng.random(noise_shape, dtype=np.float32) * np.float32(0.14) - np.float32(0.07)
      title = _title(draws, recipe.nouns)
      image = _png(_image(draws, noise, recipe, spec.image_size))
      if spec.shortcut_strength is not None and recipe.line is not None:
        title += f" {_line_word(draws, recipe, spec, split)} line"
      yield {
          "id": f"{split}-{index * len(recipes) + class_index:06d}",
          "title": title,
          "image": image,
          "label": recipe.info.name,
      }


PRODUCTS_CSV = "products.csv"
IMAGES = "images"


def write_products(directory: str, spec: ToyshopSpec, split: str = "test", *,
                   labels: bool = False, limit: int = 0, id_prefix: str = "") -> str:
  """A split's examples as a product folder: `products.csv` (id, title, image[, label]) and
  `images/{id}.png` (lossless, so a product's pixels are the dataset's), the first `limit` (0:
  all), ids prefixed by `id_prefix`. New products for a trained workdir: the same class sizes with
  another seed. Returns the CSV's path."""
  os.makedirs(os.path.join(directory, IMAGES), exist_ok=True)
  path = os.path.join(directory, PRODUCTS_CSV)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "title", "image"] + (["label"] if labels else []))
    for count, example in enumerate(examples(spec, split)):
      if limit and count == limit:
        break
      product_id = f"{id_prefix}{example['id']}"
      image = f"{product_id}.png"
      with open(os.path.join(directory, IMAGES, image), "wb") as image_file:
        image_file.write(example["image"])
      writer.writerow([product_id, example["title"], image]
                      + ([example["label"]] if labels else []))
  return path
