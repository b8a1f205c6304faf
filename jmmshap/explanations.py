"""Explanation cards people can look at: one product's photo with its MM-SHAP image regions shaded,
its title with every word coloured by its Shapley value, T-SHAP / V-SHAP as a bar, the ensemble's
top classes and each learner's vote.

A `Card` holds plain values (the predictor fills it); this module only draws it, as HTML
(`page`: one self-contained file, photos inlined, no network) and as a PNG (`Card.png`, for
papers). Colours: red where a player pushed the explained class up, blue where it pushed it down,
opacity |phi| / the largest |phi| of that product over both modalities, so a word and an image region
of the same opacity weigh the same.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import io
import re
from collections.abc import Sequence

import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

POSITIVE = (214, 39, 40)  # Red: raises the explained class's value.
NEGATIVE = (31, 119, 180)  # Blue: lowers it.
TEXT_COLOUR = (70, 130, 180)  # T-SHAP in the share bar.
IMAGE_COLOUR = (230, 140, 30)  # V-SHAP.
MAX_OPACITY = 0.65
PHOTO_SIZE = 192  # Display size of the photo's longer side, in pixels; the photo and its shaded
PNG_PHOTO_SIZE = PHOTO_SIZE  # copy are shown side by side.
_INLINE_SIDE = 256  # Inlined photos are scaled down to this (real photos are megabytes).


@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of the title: the characters of one text player (value set) or of none."""
  text: str
  player: int | None = None
  value: float | None = None


@dataclasses.dataclass(frozen=True)
class Region:
  """One image player: the part of the photo its embedding pools, as fractions (top, left,
  bottom, right), and its Shapley value."""
  box: tuple[float, float, float, float]
  value: float


@dataclasses.dataclass
class Card:
  """Everything one product's explanation shows."""
  id: str
  photo: np.ndarray  # uint8 (H, W, 3), as given.
  segments: list[Segment]  # The title, in order.
  regions: list[Region]  # Empty when not explained.
  t_shap: float | None  # None: not explained; NaN: undefined (every phi 0).
  v_shap: float | None
  explained: str  # What the values explain, e.g. "the MMBT's logit of 'lamp' (exact, 6 players)".
  method: str  # The ensemble method the top classes come from.
  top_classes: list[tuple[str, float]]
  votes: list[tuple[str, str, float]]  # (learner or method, class, probability)
  label: str | None = None

  @property
  def scale(self) -> float:
    """The largest |phi| of the product over both modalities (1 when there is none)."""
    values = [abs(s.value) for s in self.segments if s.value is not None]
    values += [abs(r.value) for r in self.regions]
    largest = max((v for v in values if np.isfinite(v)), default=0.0)
    return largest if largest > 0 else 1.0

  def html(self) -> str:
    return card_html(self)

  def _repr_html_(self) -> str:  # Jupyter shows a card as itself.
    return f"<style>{STYLE}</style>{card_html(self)}"

  def png(self) -> bytes:
    return card_png(self)


def shade(value: float | None, scale: float) -> tuple[int, int, int, float] | None:
  """(r, g, b, opacity) of a Shapley value on a card whose largest |phi| is `scale`."""
  if value is None or not np.isfinite(value) or value == 0:
    return None
  colour = POSITIVE if value > 0 else NEGATIVE
  return (*colour, float(min(1.0, abs(value) / scale) * MAX_OPACITY))


def pooling_boxes(grid: tuple[int, int],
                  feature_size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
  """The photo fractions each image embedding pools, in the MMBT's order (row-major), for its
  adaptive average pool of a feature map of `feature_size` into `grid` bins (torch's bins)."""
  rows, cols = grid
  height, width = feature_size

  def bins(size: int, count: int) -> list[tuple[float, float]]:
    return [(i * size // count / size, -(-(i + 1) * size // count) / size) for i in range(count)]

  return [(top, left, bottom, right) for top, bottom in bins(height, rows)
          for left, right in bins(width, cols)]


def _fmt(value: float | None) -> str:
  return "n/a" if value is None or not np.isfinite(value) else f"{value:+.3f}"


def _share(value: float | None) -> str:
  return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"


def _rgba(colour: tuple[int, int, int, float] | None) -> str:
  return "transparent" if colour is None else "rgba({}, {}, {}, {:.3f})".format(*colour)


def inline_photo(photo: np.ndarray) -> str:
  """A data: URI of the photo, scaled down to fit `_INLINE_SIDE` (JPEG when scaled, else PNG)."""
  image = Image.fromarray(np.asarray(photo, np.uint8))
  buffer = io.BytesIO()
  if max(image.size) > _INLINE_SIDE:
    image.thumbnail((_INLINE_SIDE, _INLINE_SIDE), Image.BILINEAR)
    image.save(buffer, format="JPEG", quality=88)
    kind = "jpeg"
  else:
    image.save(buffer, format="PNG")
    kind = "png"
  return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _display_size(photo: np.ndarray) -> tuple[int, int]:
  height, width = photo.shape[:2]
  factor = PHOTO_SIZE / max(height, width)
  return max(1, round(width * factor)), max(1, round(height * factor))


def card_html(card: Card) -> str:
  """One card as an HTML fragment (styles in `STYLE`)."""
  scale, escape = card.scale, html.escape
  width, height = _display_size(card.photo)
  photo = inline_photo(card.photo)  # Shown as it is and under its regions.
  pixelated = " pixelated" if width >= 2 * card.photo.shape[1] else ""
  regions = "".join(
      f'<div class="region" data-phi="{r.value:.6g}" title="image region {i + 1}: '
      f'&#966; = {_fmt(r.value)}" style="top:{100 * r.box[0]:.3f}%;left:{100 * r.box[1]:.3f}%;'
      f'height:{100 * (r.box[2] - r.box[0]):.3f}%;width:{100 * (r.box[3] - r.box[1]):.3f}%;'
      f'background:{_rgba(shade(r.value, scale))}"><span class="phi">{_fmt(r.value)}</span></div>'
      for i, r in enumerate(card.regions))
  words = "".join(
      escape(s.text) if s.player is None else
      f'<span class="word" data-player="{s.player}" data-phi="{s.value:.6g}" '
      f'title="word player {s.player + 1}: &#966; = {_fmt(s.value)}" '
      f'style="background:{_rgba(shade(s.value, scale))}">{escape(s.text)}</span>'
      for s in card.segments)
  if card.t_shap is None:
    shares = '<p class="muted">Not explained (--no_explain): no MM-SHAP for this product.</p>'
  else:
    t_width = 0.0 if not np.isfinite(card.t_shap) else 100 * card.t_shap
    shares = (f'<div class="shares" data-t-shap="{card.t_shap:.6g}">'
              f'<span class="t" style="width:{t_width:.2f}%"></span>'
              f'<span class="v" style="width:{100 - t_width:.2f}%"></span></div>'
              f'<p class="legend"><b class="t-key">T-SHAP {_share(card.t_shap)}</b> title, '
              f'<b class="v-key">V-SHAP {_share(card.v_shap)}</b> photo. '
              f'{escape(card.explained)}</p>')
  top = "".join(
      f'<tr><td>{escape(name)}</td><td class="num">{p:.3f}</td><td class="barcell">'
      f'<span class="pbar" style="width:{100 * p:.1f}%"></span></td></tr>'
      for name, p in card.top_classes)
  votes = "".join(f"<tr><td>{escape(who)}</td><td>{escape(name)}</td><td class=\"num\">{p:.3f}</td>"
                  "</tr>" for who, name, p in card.votes)
  verdict = ""
  if card.label is not None:
    right = card.top_classes and card.top_classes[0][0] == card.label
    verdict = (f'<span class="label {"right" if right else "wrong"}">label: {escape(card.label)} '
               f'{"&#10003;" if right else "&#10007;"}</span>')
  return (
      f'<section class="card" data-id="{escape(card.id)}"><h2>{escape(card.id)} {verdict}</h2>'
      f'<div class="body"><img class="{pixelated.strip()}" alt="photo of {escape(card.id)}" '
      f'width="{width}" height="{height}" src="{photo}">'
      f'<div class="photo" style="width:{width}px;height:{height}px"><img class="'
      f'{pixelated.strip()}" alt="MM-SHAP image regions of {escape(card.id)}" width="{width}" '
      f'height="{height}" src="{photo}">{regions}</div>'
      f'<div class="info"><p class="title">{words}</p>{shares}'
      f'<h3>{escape(card.method)}: top classes</h3><table class="top">{top}</table>'
      f'<h3>votes</h3><table class="votes">{votes}</table></div></div></section>')


STYLE = """
body{font-family:-apple-system,"DejaVu Sans",Arial,sans-serif;margin:24px;color:#222;background:#f6f6f6}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin:0 0 16px;
max-width:1000px}
.card h2{font-size:15px;margin:0 0 8px;font-weight:600}.card h3{font-size:12px;margin:10px 0 4px;
color:#555;text-transform:uppercase;letter-spacing:.04em}
.body{display:flex;gap:12px;align-items:flex-start}.body>img{flex:none;display:block}
.photo{position:relative;flex:none;margin-right:6px}.photo img{display:block}
img.pixelated{image-rendering:pixelated}
.region{position:absolute;box-sizing:border-box;border:1px dashed rgba(0,0,0,.35)}
.phi{position:absolute;top:2px;left:3px;font-size:10px;color:#fff;text-shadow:0 0 2px #000,0 0 2px #000}
.info{flex:1;min-width:0}.title{font-size:17px;line-height:1.9;margin:0 0 8px}
.word{padding:2px 3px;border-radius:3px;border:1px solid rgba(0,0,0,.12)}
.shares{display:flex;height:14px;border-radius:7px;overflow:hidden;background:#eee;max-width:420px}
.shares .t{background:rgb(70,130,180)}.shares .v{background:rgb(230,140,30)}
.legend{font-size:12px;color:#444;margin:4px 0 0}.t-key{color:rgb(70,130,180)}
.v-key{color:rgb(200,110,10)}
table{border-collapse:collapse;font-size:13px}td{padding:1px 8px 1px 0}.num{text-align:right;
font-variant-numeric:tabular-nums}.barcell{width:160px}.pbar{display:block;height:9px;
background:#888;border-radius:2px}.muted{color:#888;font-size:13px}
.label{font-size:12px;font-weight:400;padding:1px 6px;border-radius:4px;margin-left:8px}
.right{background:#e3f3e3;color:#1b6e1b}.wrong{background:#fbe4e4;color:#9b1c1c}
.key{display:inline-block;width:12px;height:12px;vertical-align:-1px;border-radius:2px}
"""


def page(cards: Sequence[Card], heading: str, notes: Sequence[str] = ()) -> str:
  """One self-contained HTML page of cards: styles inline, photos as data: URIs, no scripts and
  nothing fetched from a network."""
  legend = ('<p><span class="key" style="background:rgba(214,39,40,.8)"></span> raises the '
            'explained class &nbsp; <span class="key" style="background:rgba(31,119,180,.8)">'
            '</span> lowers it; opacity: |&#966;| relative to the product\'s largest. Hover a '
            'word or an image region for its Shapley value &#966;.</p>')
  notes_html = "".join(f"<p>{html.escape(note)}</p>" for note in notes)
  return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(heading)}</title><style>{STYLE}</style></head><body>"
          f"<h1 style=\"font-size:20px\">{html.escape(heading)}</h1>{notes_html}{legend}"
          + "".join(card_html(card) for card in cards) + "</body></html>\n")


# --------------------------------------------------------------------------------------------------
# PNG.


def png_name(row: int, product_id: str) -> str:
  """A card's PNG file name: its row (unique, in input order) and the first 60 characters of its
  id, each one other than a letter, digit, '.', '_' or '-' made '_'. Ids come from the user's
  CSV: none can name a folder, a path outside explanations/ or a hidden file (the row comes first,
  so '..' is a plain name)."""
  return f"{row:05d}-{re.sub(r'[^A-Za-z0-9._-]', '_', product_id)[:60]}.png"


@functools.lru_cache(maxsize=8)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
  path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans",
                                                           weight="bold" if bold else "normal"))
  return ImageFont.truetype(path, size)


def _blend(base: tuple[int, int, int], colour: tuple[int, int, int, float] | None
           ) -> tuple[int, int, int]:
  if colour is None:
    return base
  *rgb, opacity = colour
  return tuple(round(b * (1 - opacity) + c * opacity) for b, c in zip(base, rgb))


def shaded_photo(card: Card, size: int = PHOTO_SIZE, labels: bool = True) -> Image.Image:
  """The photo at `size` px (longer side) with each image region's shade blended over it, and
  (`labels`) its Shapley value written in the region's corner."""
  photo = Image.fromarray(np.asarray(card.photo, np.uint8))
  width, height = (round(side * size / max(photo.size)) for side in photo.size)
  upscale = width >= 2 * photo.size[0]
  photo = photo.resize((width, height), Image.NEAREST if upscale else Image.BILINEAR)
  canvas = photo.convert("RGBA")
  scale = card.scale
  for region in card.regions:
    colour = shade(region.value, scale)
    top, left, bottom, right = region.box
    box = (round(left * width), round(top * height), round(right * width) - 1,
           round(bottom * height) - 1)
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if colour is not None:
      draw.rectangle(box, fill=(*colour[:3], round(255 * colour[3])))
    draw.rectangle(box, outline=(0, 0, 0, 90))
    if labels:
      draw.text((box[0] + 4, box[1] + 3), _fmt(region.value), font=_font(11), fill=(255, 255, 255),
                stroke_width=2, stroke_fill=(0, 0, 0))
    canvas = Image.alpha_composite(canvas, layer)
  return canvas.convert("RGB")


def card_png(card: Card) -> bytes:
  """The card as a PNG: the photo and its shaded copy on the left; the title (each word's value
  listed under it), the shares, what is explained, top classes and votes on the right."""
  margin, gap, text_width, line_height = 16, 20, 540, 30
  shaded = shaded_photo(card, PNG_PHOTO_SIZE)
  photo = Image.new("RGB", (2 * shaded.size[0] + 8, shaded.size[1]), "white")
  photo.paste(shaded_photo(dataclasses.replace(card, regions=[]), PNG_PHOTO_SIZE), (0, 0))
  photo.paste(shaded, (shaded.size[0] + 8, 0))
  font, small, bold = _font(16), _font(12), _font(15, bold=True)
  lines = _title_lines(card, font, text_width)
  explained = _wrap(card.explained, small, text_width) if card.t_shap is not None else []
  players = {s.player: (s.text.strip(), s.value) for s in card.segments if s.player is not None}
  values = _wrap("   ".join(f"{text} {_fmt(value)}" for text, value in players.values()), small,
                 text_width) if players else []
  height = max(photo.size[1] + 24, 30 + line_height * len(lines) + 18 * len(values) + 50
               + 18 * len(explained) + 44 + 20 * (len(card.top_classes) + len(card.votes)))
  image = Image.new("RGB", (margin * 2 + photo.size[0] + gap + text_width, height + 2 * margin),
                    "white")
  image.paste(photo, (margin, margin))
  draw = ImageDraw.Draw(image)
  draw.text((margin, margin + photo.size[1] + 6), "photo; its MM-SHAP image regions: red raises, "
            "blue lowers the explained class", fill=(110, 110, 110), font=_font(10))
  x0, y = margin + photo.size[0] + gap, margin
  heading = card.id if card.label is None else f"{card.id}   (label: {card.label})"
  draw.text((x0, y), heading, fill=(30, 30, 30), font=bold)
  y += 28
  scale = card.scale
  for line in lines:
    x = x0
    for text, segment in line:
      length = draw.textlength(text, font=font)
      colour = None if segment.player is None else shade(segment.value, scale)
      if colour is not None:
        draw.rectangle((x - 1, y - 2, x + length + 1, y + 21), fill=_blend((255, 255, 255), colour))
      draw.text((x, y), text, fill=(20, 20, 20), font=font)
      x += length
    y += line_height
  for text in values:
    draw.text((x0, y), text, fill=(100, 100, 100), font=small)
    y += 18
  y += 6
  if card.t_shap is not None:
    bar = 360
    t_share = 0.0 if not np.isfinite(card.t_shap) else card.t_shap
    split = x0 + round(bar * t_share)
    draw.rectangle((x0, y, x0 + bar, y + 12), fill=IMAGE_COLOUR)
    if split > x0:
      draw.rectangle((x0, y, split, y + 12), fill=TEXT_COLOUR)
    draw.text((x0, y + 16), f"T-SHAP {_share(card.t_shap)} (title)   V-SHAP "
              f"{_share(card.v_shap)} (photo)", fill=(60, 60, 60), font=small)
    y += 38
    for text in explained:
      draw.text((x0, y), text, fill=(90, 90, 90), font=small)
      y += 18
  y += 6
  draw.text((x0, y), f"{card.method}: top classes", fill=(90, 90, 90), font=small)
  y += 18
  for name, probability in card.top_classes:
    draw.rectangle((x0 + 300, y + 3, x0 + 300 + round(160 * probability), y + 12),
                   fill=(136, 136, 136))
    draw.text((x0, y), f"{name}", fill=(20, 20, 20), font=small)
    draw.text((x0 + 250, y), f"{probability:.3f}", fill=(20, 20, 20), font=small)
    y += 20
  y += 6
  draw.text((x0, y), "votes", fill=(90, 90, 90), font=small)
  y += 18
  for who, name, probability in card.votes:
    draw.text((x0, y), f"{who}: {name} ({probability:.3f})", fill=(20, 20, 20), font=small)
    y += 20
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
  lines = [""]
  for piece in _pieces(text):
    if lines[-1] and measure(lines[-1] + piece, font=font) > width:
      lines.append("")
    lines[-1] += piece
  return lines


def _title_lines(card: Card, font: ImageFont.FreeTypeFont,
                 width: int) -> list[list[tuple[str, Segment]]]:
  """The title's pieces wrapped into lines of at most `width` px, breaking at spaces."""
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
  lines: list[list[tuple[str, Segment]]] = [[]]
  used = 0.0
  for segment in card.segments:
    for piece in _pieces(segment.text):
      length = measure(piece, font=font)
      if used + length > width and lines[-1] and piece.strip():
        lines.append([])
        used = 0.0
        piece = piece.lstrip()
        length = measure(piece, font=font)
      lines[-1].append((piece, segment))
      used += length
  return lines


def _pieces(text: str) -> list[str]:
  """Text split after each space, so that a line may break there: 'a b' -> ['a ', 'b']."""
  pieces, start = [], 0
  for position, char in enumerate(text):
    if char == " ":
      pieces.append(text[start:position + 1])
      start = position + 1
  if start < len(text):
    pieces.append(text[start:])
  return pieces
