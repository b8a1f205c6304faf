"""explanations: the page and the PNG names cannot be turned against their reader. Titles, ids and
class names come from a catalogue someone else wrote; whatever they hold renders as text, and a
card's file name stays a plain name inside the output folder."""

import html.parser
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from jmmshap import explanations

SCRIPT = "<script>alert(1)</script>"
BREAKOUT = '"><img src=x onerror=alert(1)>'
AMPERSAND = "Salt & Pepper"
HOSTILE = (SCRIPT, BREAKOUT, AMPERSAND)


def _hostile_card() -> explanations.Card:
  """A card whose every field a catalogue or a workdir fills holds markup."""
  boxes = explanations.pooling_boxes((2, 2), (4, 4))
  return explanations.Card(
      id=BREAKOUT + SCRIPT,
      photo=np.full((16, 16, 3), 128, np.uint8),
      segments=[explanations.Segment(SCRIPT, 0, 1.5), explanations.Segment(" "),
                explanations.Segment(BREAKOUT, 1, -0.5), explanations.Segment(f" {AMPERSAND}")],
      regions=[explanations.Region(box, value) for box, value in zip(boxes, (1.0, 0.0, 0.0, -1.0))],
      t_shap=0.4, v_shap=0.6,
      explained=f"Shapley values of the MMBT's logit for {SCRIPT!r}, exact over 6 players.",
      method=f"stacked {BREAKOUT}",
      top_classes=[(SCRIPT, 0.6), (BREAKOUT, 0.3), (AMPERSAND, 0.1)],
      votes=[("text", SCRIPT, 0.6), (BREAKOUT, AMPERSAND, 0.5)],
      label=BREAKOUT)


class _Parsed(html.parser.HTMLParser):
  """The tags, attributes and text a browser would see."""

  def __init__(self, page: str):
    super().__init__(convert_charrefs=True)
    self.tags: list[tuple[str, dict[str, str | None]]] = []
    self.text: list[str] = []
    self.feed(page)
    self.close()

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))

  def handle_data(self, data):
    self.text.append(data)


def test_markup_in_titles_ids_and_class_names_renders_as_text():
  page = explanations.page([_hostile_card()], f"MM-SHAP {AMPERSAND}", notes=[f"workdir {SCRIPT}"])
  parsed = _Parsed(page)
  # No tag or attribute but the page's own: no script, no image but the inlined photos, no handler.
  assert "script" not in {tag for tag, _ in parsed.tags}
  assert all(attrs["src"].startswith("data:image/") for tag, attrs in parsed.tags if tag == "img")
  assert not [name for _, attrs in parsed.tags for name in attrs if name.startswith("on")]
  # The data, as characters: escaped in the source, itself once read.
  assert "<script" not in page and "<img src=x" not in page
  assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
  assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
  assert "Salt &amp; Pepper" in page and "Salt & Pepper" not in page
  text = "".join(parsed.text)
  for value in HOSTILE:
    assert value in text
  sections = [attrs for tag, attrs in parsed.tags if tag == "section"]
  assert [attrs["data-id"] for attrs in sections] == [BREAKOUT + SCRIPT]


def test_a_hostile_card_still_renders_as_a_png_wider_than_its_photo():
  with Image.open(io.BytesIO(_hostile_card().png())) as image:
    assert image.format == "PNG" and image.width > 2 * explanations.PNG_PHOTO_SIZE


@pytest.mark.parametrize("product_id", [
    SCRIPT, BREAKOUT, AMPERSAND, "../../etc/passwd", "..", ".", "", "a/b\\c", "/abs/path",
    "C:\\evil", "new\nline\x00nul", "ünïcödé", "x" * 300])
def test_a_png_name_is_a_plain_file_name_inside_the_folder(product_id, tmp_path):
  name = explanations.png_name(7, product_id)
  assert re.fullmatch(r"00007-[A-Za-z0-9._-]{0,60}\.png", name), name
  assert os.path.basename(name) == name and name not in (".", "..")
  folder = str(tmp_path / "explanations")
  assert os.path.dirname(os.path.normpath(os.path.join(folder, name))) == folder


def test_png_names_of_two_rows_differ_whatever_their_ids():
  assert explanations.png_name(0, "a/b") != explanations.png_name(1, "a_b")
  assert explanations.png_name(3, "x" * 300) != explanations.png_name(4, "x" * 300)
